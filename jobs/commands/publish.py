"""`maskpipe publish`: a folder ready for the Hugging Face Hub (an artifact and its model card), optionally
uploaded. The logic lives in `pipeline.run.publish`.
"""

from __future__ import annotations

import sys


def add(sub) -> None:
    pb = sub.add_parser("publish", help="a folder ready for the Hugging Face Hub: an artifact and its model card")
    pb.add_argument("source", help="a run directory (its learned artifact, or --stage) or an artifact directory")
    pb.add_argument("--out", required=True, help="the folder to write (replaced if it holds an earlier publish)")
    pb.add_argument("--stage", default=None, help="the run's stage whose artifact to publish")
    pb.add_argument("--base-model", default=None,
                    help="hub id of the base model for the card (default: the artifact's model name)")
    pb.add_argument("--license", default="apache-2.0",
                    help="license of the card's front matter (default: apache-2.0, maskpipe's own license)")
    pb.add_argument("--model", default=None, metavar="PATH_OR_ID",
                    help="check the artifact's fingerprint and shapes against this model (default: the base model "
                         "the artifact names, when that is a local folder here)")
    pb.add_argument("--push", default=None, metavar="REPO",
                    help="upload the folder to this Hub model repo (token from HF_TOKEN or a saved login)")
    pb.add_argument("--dry-run", action="store_true", help="with --push: list what would be uploaded, upload nothing")
    pb.set_defaults(fn=cmd_publish, check_out=_check_out)


def _check_out(out: str) -> None:
    from maskpipe.pipeline.run.publish import check_out

    check_out(out)


def cmd_publish(a) -> None:
    from maskpipe.pipeline.io.artifacts import read_manifest
    from maskpipe.pipeline.io.hub import hub_ref
    from maskpipe.pipeline.run.publish import model_at_hand, publish, push, resolve

    artifact, run = resolve(a.source, a.stage)
    out = publish(artifact, run, a.out, repo=a.push, base_model=a.base_model, license=a.license, model=a.model)
    print(f"{artifact}{f' (run {run})' if run else ''}: published to {out}")
    manifest = read_manifest(artifact)
    base = a.base_model or manifest["base_model"]["name_or_path"]
    if model_at_hand(manifest, a.model) is None:
        print(f"warning: the base model {manifest['base_model']['name_or_path']!r} is not a folder here, so the "
              "artifact's fingerprint was not checked against it; give --model PATH_OR_ID to check it",
              file=sys.stderr)
    if hub_ref(base) is None:
        print(f"warning: the base model {base!r} is no hub id, so the card has no base_model; name it with "
              "--base-model ORG/NAME", file=sys.stderr)
    if a.push:
        files = push(out, a.push, dry_run=a.dry_run)
        verb = "would upload" if a.dry_run else "uploaded"
        print(f"{verb} to https://huggingface.co/{a.push}: " + ", ".join(files))
