"""Plugin discovery (pluggy entry points, group ``mq``) and the typed registries it fills."""

from mq_core.plugins.manager import MQPluginWarning, PluginRecord, get_manager, reset
from mq_core.plugins.registry import Entry, Registry

__all__ = ["Entry", "MQPluginWarning", "PluginRecord", "Registry", "get_manager", "reset"]
