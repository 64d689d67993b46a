"""Entry point of mq-algos (group ``mq``)."""
