"""The fit table of docs/running_at_scale.md: the paper's experiments compiled for TPU slices.

  python -m experiments.fit_table --run
  python -m experiments.fit_table --write_doc

`--run` compiles each entry of ENTRIES not yet in the records file with
`python -m resnet_jax.training.compile` (libtpu; an ImageNet net takes minutes on 2 cores, so run it in
the background), one entry after another, appending its steps to the records file as it goes:
stopped anywhere, the same command carries on with the entries still missing. `--write_doc`
renders the records as the table between the fit-table markers of docs/running_at_scale.md.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from absl import app, flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "running_at_scale.md"
RECORDS = REPO_ROOT / "experiments" / "results" / "fit_table" / "records.jsonl"
BEGIN, END = "<!-- fit-table -->", "<!-- /fit-table -->"

IMAGENET_CONFIGS = ("imagenet_plain18", "imagenet_plain34", "imagenet_resnet18",
                    "imagenet_resnet18_a", "imagenet_resnet34_a", "imagenet_resnet34_b",
                    "imagenet_resnet34_c", "imagenet_resnet50", "imagenet_resnet101",
                    "imagenet_resnet152")
# (config, topology, overrides, whether to search the largest per-chip batch too): every
# ImageNet config at the paper's global batch of 256 on 8-chip v5e and v6e slices (2 hosts each),
# ResNet-50 on v4 and v5p, ResNet-50 on 256 chips at 64 and 128 images per chip (and the
# largest that fits), CIFAR ResNet-110 and 1202 at the paper's batch of 128 on 4 chips, and
# Goyal et al.'s batch-8k recipe on 256 chips.
ENTRIES: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    *((config, topology, (), False) for topology in ("v5e:2x4", "v6e:2x4")
      for config in IMAGENET_CONFIGS),
    ("imagenet_resnet50", "v4:2x2x1", (), False),
    ("imagenet_resnet50", "v5p:2x2x2", (), False),
    *(("imagenet_resnet50", topology, (f"--config.batch_size={per_chip * 256}",
                                       f"--config.eval_batch_size={per_chip * 256}"),
       per_chip == 128)
      for topology in ("v5e:16x16", "v6e:16x16") for per_chip in (64, 128)),
    *((config, topology, (), False) for topology in ("v5e:2x2", "v6e:2x2")
      for config in ("cifar_resnet110", "cifar_resnet1202")),
    ("imagenet_resnet50_goyal8k", "v5e:16x16", (), False),
)

_RECORDS = flags.DEFINE_string("records", str(RECORDS), "The JSON-lines file of compiled steps "
                               "(committed, so that the next session resumes it).")
_RUN = flags.DEFINE_bool("run", False, "Compile the entries missing from --records.")
_WRITE_DOC = flags.DEFINE_bool("write_doc", False, f"Write the table into {DOC.name}.")
_EARLIER = flags.DEFINE_string("earlier_records", None, "Records of an earlier commit: --run "
                               "skips their entries, and the table shows them (with their "
                               "commit) for the entries --records lacks.")


def entry_key(config: str, topology: str, overrides: Sequence[str]) -> str:
  return " ".join((config, topology, *overrides))


def read_records(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _part(step: str) -> str:
  return "train" if step == "train" else "eval"


def run_entries(path: pathlib.Path, earlier: pathlib.Path | None = None) -> int:
  """Compiles the steps missing from `path` (and from `earlier`, if given); returns how many
  commands failed.

  Each entry's train step and its evaluation steps compile in processes of their own (a
  compile's host memory is freed only when its process ends), and each part's records are kept
  as soon as it succeeds.
  """
  done = {(record["entry"], _part(record["step"]))
           for record in read_records(path) + (read_records(earlier) if earlier else [])}
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                          capture_output=True, check=False).stdout.strip()
  failures = 0
  # ResNet-50's entries first, ResNet-1202's last (each of its compiles takes a quarter of an
  # hour or more here); the table keeps ENTRIES' order.
  run_order = sorted(ENTRIES, key=lambda entry: (not entry[0].startswith("imagenet_resnet50"),
                                                 entry[0] == "cifar_resnet1202"))
  for config, topology, overrides, largest in run_order:
    key = entry_key(config, topology, overrides)
    for part in ("train", "eval"):
      if (key, part) in done:
        continue
      with tempfile.TemporaryDirectory() as scratch:
        steps = pathlib.Path(scratch) / "steps.jsonl"
        command = [sys.executable, "-m", "resnet_jax.training.compile", f"--config={config}",
                   f"--topology={topology}", f"--steps={part}", *overrides, f"--record={steps}",
                   *(["--largest_batch"] if largest and part == "train" else [])]
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command[1:])}", flush=True)
        completed = subprocess.run(command, cwd=REPO_ROOT, text=True, capture_output=True,
                                   check=False)
        print(completed.stdout, end="", flush=True)
        if completed.returncode:
          failures += 1
          print(f"failed ({completed.returncode}): "
                f"{completed.stderr.strip().splitlines()[-1:]}", flush=True)
          continue
        with path.open("a") as out:
          for record in read_records(steps):
            out.write(json.dumps({"entry": key, "config": config, "commit": commit, **record})
                      + "\n")
  return failures


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / (1 << 30):.2f}"


def markdown(records: list[dict]) -> str:
  """The table: a row per compiled step, in ENTRIES' order."""
  order = {entry_key(*entry[:3]): index for index, entry in enumerate(ENTRIES)}
  rows = sorted((r for r in records if r["entry"] in order),
                key=lambda r: (order[r["entry"]], r["step"] != "train", r["largest"]))
  lines = ["| config | slice | step | per-chip batch | memory per chip / HBM (GiB) | fits | "
           "compile here (s) | ceiling (images/s per chip) | bound by | host cores needed | "
           "commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    cores = r["host_cores"] if r["step"] == "train" else ""
    if r["step"] == "train" and not cores:
      cores = "0 (data on the chips)"
    batch = f"{r['batch_per_chip']}" + (" (largest)" if r["largest"] else "")
    lines.append(
        f"| {r['config']} | {r['topology']} ({r['chips']} chips, {r['hosts']} "
        f"host{'s' if r['hosts'] > 1 else ''}) | "
        f"{r['step']} | {batch} | {_gib(r['memory_bytes'])} / {_gib(r['hbm_bytes'])} | "
        f"{'yes' if r['fits'] else 'no'} | {r['compile_s']:.0f} | "
        f"{r['ceiling_images_per_s_per_chip']:,.0f} | {r['bound']} | {cores} | "
        f"{r['commit']} |")
  missing = [key for key in order if key not in {r["entry"] for r in records}]
  if missing:
    lines.append("")
    lines.append("Not compiled yet: " + "; ".join(f"`{key}`" for key in missing) + ".")
  lines.append("")
  lines.append("Made by `python -m experiments.fit_table --run`, then `--write_doc` "
               "(records in `experiments/results/fit_table/`), at the commits of the last column.")
  return "\n".join(lines)


def write_doc(records: list[dict], doc: pathlib.Path = DOC) -> None:
  text = doc.read_text()
  if BEGIN not in text or END not in text:
    raise SystemExit(f"error: {doc} has no {BEGIN} ... {END} markers for the table.")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  doc.write_text(f"{head}{BEGIN}\n{markdown(records)}\n{END}{tail}")


def main(argv):
  del argv
  path = pathlib.Path(_RECORDS.value).expanduser()
  earlier = pathlib.Path(_EARLIER.value).expanduser() if _EARLIER.value else None
  failures = run_entries(path, earlier) if _RUN.value else 0
  if _WRITE_DOC.value:
    records = read_records(path)
    if earlier:
      done = {record["entry"] for record in records}
      records += [record for record in read_records(earlier) if record["entry"] not in done]
    write_doc(records)
  sys.exit(1 if failures else 0)


if __name__ == "__main__":
  app.run(main)
