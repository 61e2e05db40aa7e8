"""A sweep's report: results table against the paper, training curves, layer responses.

  python -m resnet_jax.tools.report --sweep_dir=/runs/table6 --out=/runs/table6/report

reads every member workdir `<sweep_dir>/<config>/seed<k>` that `experiments.sweeps`
made, and writes `report.md` with `curves.png` (Figs. 1, 4, 6: training error thin
and dashed, test error bold, against iterations) and, where checkpoints exist,
`layer_responses.png` (Fig. 7). Both directories may be local or gs:// (read and written
through etils.epath).
"""

from __future__ import annotations

import json
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import flags
from etils import epath

from resnet_jax.models import analysis
from resnet_jax.training import cli, metrics

# Top-1 test error (%) of the paper, by the test protocol of its table and config: (reference
# for the difference, as printed). CIFAR-10: Table 6, the whole 32x32 test image (plain nets
# appear in Fig. 6 only). ImageNet validation: Tables 2 and 3 by 10-crop testing, Table 4 by
# fully convolutional multi-scale testing (top-5 errors in the printed text); Goyal et al.'s
# batch-8k recipe (their Table 1, gradual warm-up) by a single 224 centre crop.
PAPER_ERRORS = {
    "center": {
        "cifar_resnet20": (8.75, "8.75"),
        "cifar_resnet32": (7.51, "7.51"),
        "cifar_resnet44": (7.17, "7.17"),
        "cifar_resnet56": (6.97, "6.97"),
        # Table 6 gives the best of 5 runs and their mean +- std; a mean compares like with like.
        "cifar_resnet110": (6.61, "6.61 ± 0.16 (5 runs; best 6.43)"),
        "cifar_resnet1202": (7.93, "7.93"),
        "imagenet_resnet50_goyal8k": (
            23.74, "23.74 ± 0.09 (Goyal et al. 2017, batch 8k; 23.60 ± 0.12 at 256)"),
    },
    "10crop": {
        "imagenet_plain18": (27.94, "27.94"),
        "imagenet_plain34": (28.54, "28.54 (top-5 10.02)"),
        "imagenet_resnet18_a": (27.88, "27.88"),
        "imagenet_resnet34": (24.52, "24.52 (option B; top-5 7.46)"),
        "imagenet_resnet34_a": (25.03, "25.03 (top-5 7.76)"),
        "imagenet_resnet34_b": (24.52, "24.52 (top-5 7.46)"),
        "imagenet_resnet34_c": (24.19, "24.19 (top-5 7.40)"),
        "imagenet_resnet50": (22.85, "22.85 (top-5 6.71)"),
        "imagenet_resnet101": (21.75, "21.75 (top-5 6.05)"),
        "imagenet_resnet152": (21.43, "21.43 (top-5 5.71)"),
    },
    "multiscale": {
        "imagenet_resnet34_b": (21.84, "21.84 (top-5 5.71)"),
        "imagenet_resnet34_c": (21.53, "21.53 (top-5 5.60)"),
        "imagenet_resnet50": (20.74, "20.74 (top-5 5.25)"),
        "imagenet_resnet101": (19.87, "19.87 (top-5 4.60)"),
        "imagenet_resnet152": (19.38, "19.38 (top-5 4.49)"),
    },
}
PROTOCOL_NAMES = {"center": "the config's own view", "10crop": "10-crop",
                  "multiscale": "multi-scale"}


LAYER_RESPONSE_IMAGES = 512  # Evaluation images the Fig. 7 statistics are taken over.


def find_members(sweep_dir: epath.Path) -> list[dict]:
  """Each member with its config, seed, summary (None until it finishes), curves and warm-up end.

  The members are those sweep.json plans (started or not) and any other
  `<config>/seed<k>` workdir found, in the sweep's order.
  """
  record = read_sweep_record(sweep_dir)
  planned = [sweep_dir / m["workdir"] for m in record.get("members", [])]
  found = sorted(set(sweep_dir.glob("*/seed*")) - set(planned))
  members = []
  for workdir in planned + [w for w in found if w.is_dir()]:
    summary_path = workdir / "summary.json"
    members.append({
        "config": workdir.parent.name, "seed": int(workdir.name.removeprefix("seed")),
        "workdir": workdir,
        "summary": json.loads(summary_path.read_text()) if summary_path.exists() else None,
        "curves": metrics.training_curves([workdir])[str(workdir)],
        # The ResNet-110 warm-up's end (Sec. 4.2), None without one or while it lasts.
        "warmup_end": next((record for record in reversed(metrics.read_metrics(workdir))
                            if record.get("kind") == "warmup_end"), None)})
  return members


def read_sweep_record(sweep_dir: epath.Path) -> dict:
  path = sweep_dir / "sweep.json"
  return json.loads(path.read_text()) if path.exists() else {}


def test_error(member: dict, protocol: str) -> float | None:
  """The member's final top-1 test error by `protocol`; None before it is known.

  "center" is the run's own final evaluation (summary.json); another protocol's is the one
  `python -m resnet_jax.training.evaluate` wrote for the final step.
  """
  if member["summary"] is None:
    return None
  if protocol == "center":
    return member["summary"]["top1_error"]
  path = member["workdir"] / "evaluations" / f"{member['summary']['steps']}-{protocol}.json"
  return json.loads(path.read_text())["top1_error"] if path.exists() else None


def table_rows(members: Sequence[dict], protocol: str = "center") -> list[dict]:
  """One row per config: finished runs' mean and std of test error by `protocol`, and the
  paper's number by the same protocol. A run is finished once that error is known."""
  rows = []
  for config in dict.fromkeys(m["config"] for m in members):
    runs = [m for m in members if m["config"] == config]
    errors = {id(m): test_error(m, protocol) for m in runs}
    finished = [m for m in runs if errors[id(m)] is not None]
    test = np.asarray([errors[id(m)] for m in finished])
    train = [m["curves"]["train_error"][-1] for m in finished if m["curves"]["train_error"].size]
    reference, paper_text = PAPER_ERRORS[protocol].get(config, (None, "—"))
    mean = float(test.mean()) if test.size else None
    rows.append({
        "config": config,
        "model": finished[0]["summary"]["model"] if finished else "",
        "dataset": ", ".join(sorted({m["summary"]["dataset"] for m in finished})),
        "num_params": finished[0]["summary"]["num_params"] if finished else None,
        "runs": len(runs), "finished": len(finished),
        "train_error": float(np.mean(train)) if train else None,
        "test_mean": mean,
        # Sample standard deviation over seeds (ddof=1), as a spread "over 5 runs" is read.
        "test_std": float(test.std(ddof=1)) if test.size > 1 else None,
        "paper": paper_text,
        "difference": mean - reference if mean is not None and reference is not None else None,
    })
  return rows


def _format_row(row: dict) -> str:
  fmt = lambda value, spec: "—" if value is None else format(value, spec)
  test = fmt(row["test_mean"], ".2f")
  if row["test_std"] is not None:
    test += f" ± {row['test_std']:.2f}"
  runs = f"{row['finished']}/{row['runs']}"
  return (f"| {row['config']} | {row['model'] or '—'} | {row['dataset'] or '—'} | "
          f"{fmt(row['num_params'], ',')} | {runs} | {fmt(row['train_error'], '.2f')} | {test} | "
          f"{row['paper']} | {fmt(row['difference'], '+.2f')} |")


def _save(figure, path: epath.Path) -> None:
  figure.tight_layout()
  with path.open("wb") as file:  # Through epath: the report may go to gs://.
    figure.savefig(file, format="png", dpi=120)
  plt.close(figure)


def _is_plain(config: str) -> bool:
  return "plain" in config


def plot_curves(members: Sequence[dict], path: epath.Path) -> bool:
  """Figs. 1/4/6: plain nets left, residual nets right; the lowest seed of each config."""
  first_runs = {}
  for member in sorted(members, key=lambda m: m["seed"]):
    if member["curves"]["train_step"].size or member["curves"]["test_step"].size:
      first_runs.setdefault(member["config"], member)
  if not first_runs:
    return False
  groups = [("plain", [c for c in first_runs if _is_plain(c)]),
            ("residual", [c for c in first_runs if not _is_plain(c)])]
  groups = [(title, configs) for title, configs in groups if configs]
  figure, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
  for axis, (title, configs) in zip(axes[0], groups):
    for index, config in enumerate(configs):
      curves, color = first_runs[config]["curves"], f"C{index}"
      axis.plot(curves["train_step"], curves["train_error"], "--", lw=0.8, color=color)
      axis.plot(curves["test_step"], curves["test_error"], "-", lw=2.2, color=color, label=config)
    axis.set(title=f"{title} nets", xlabel="iterations", ylabel="error (%)")
    axis.grid(alpha=0.3)
    axis.legend(title="dashed: training, bold: test", fontsize=8)
  _save(figure, path)
  return True


def plot_layer_responses(responses: dict[str, np.ndarray], path: epath.Path) -> None:
  """Fig. 7: std of each 3x3 layer's response, by layer index (top) and sorted (bottom)."""
  figure, (by_layer, by_size) = plt.subplots(2, 1, figsize=(8, 7))
  for index, (config, values) in enumerate(responses.items()):
    style = dict(color=f"C{index}", ls="--" if _is_plain(config) else "-", label=config)
    layers = np.arange(1, len(values) + 1)
    by_layer.plot(layers, values, **style)
    by_size.plot(layers, np.sort(values)[::-1], **style)
  by_layer.set(xlabel="layer index (original)", ylabel="std")
  by_size.set(xlabel="layer index (sorted by magnitude)", ylabel="std")
  for axis in (by_layer, by_size):
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  _save(figure, path)


def trained_layer_responses(workdir: epath.Path, datasets: dict) -> np.ndarray:
  """Restores a member's newest checkpoint and measures its layer responses (Fig. 7).

  `datasets` caches input pipelines by their config, shared between members.
  """
  # Imported here: the table and curves need neither jax's trainer nor the data.
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from resnet_jax.training import checkpoints, optim, loop  # pylint: disable=g-import-not-at-top
  from resnet_jax import data  # pylint: disable=g-import-not-at-top

  config = loop.recorded_config(
      ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text())))
  mesh = data.core.make_mesh()
  dataset_config = loop.dataset_config(config)
  key = json.dumps(dataset_config.to_dict(), sort_keys=True)
  if key not in datasets:
    datasets[key] = data.create(dataset_config, mesh)
  dataset = datasets[key]
  model = loop.create_model(config, dataset.info.num_classes, config.seed,
                             data.core.platform(mesh))
  state = jax.device_put(loop.create_train_state(model, optim.create(config)),
                         NamedSharding(mesh, PartitionSpec()))
  reader = checkpoints.Reader(workdir)  # Reads only: the run may still be training.
  state, _ = reader.restore(reader.latest_step(), state)
  nnx.update(model, state.params, state.batch_stats)
  # The run's own evaluation batches (a size its devices and data allow), up to N images.
  images, count = [], 0
  for batch in dataset.eval_batches(config.eval_batch_size, "center"):
    images.append(np.asarray(data.views(batch)[0])[np.asarray(batch.mask)])
    count += len(images[-1])
    if count >= LAYER_RESPONSE_IMAGES:
      break
  images = np.concatenate(images)[:LAYER_RESPONSE_IMAGES]
  return analysis.layer_responses(model, images)


def _has_checkpoints(workdir: epath.Path) -> bool:
  directory = workdir / "checkpoints"
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _schedule_line(record: dict) -> str:
  schedule = record.get("schedule")
  if schedule == "full":
    return ("Schedule: **full**, each config's own recipe (the paper's on CIFAR-10: 64k "
            "iterations, drops at 32k/48k).")
  if schedule == "short":
    return (f"Schedule: **short**, {record['steps']} iterations: the paper's recipe with every "
            "iteration count scaled to that length (learning-rate drops at 1/2 and 3/4 on "
            "CIFAR-10); errors are not comparable to the paper's converged numbers.")
  return "Schedule: unknown (no sweep.json in the sweep directory)."


def _dataset_notes(rows: Sequence[dict]) -> list[str]:
  names = sorted({name for row in rows for name in row["dataset"].split(", ") if name})
  notes = [f"Datasets used: {', '.join(f'`{n}`' for n in names) or 'none finished yet'}."]
  if any("cifar10-jpeg" in name for name in names):
    notes.append("`cifar10-jpeg` is CIFAR-10 stored as JPEG: compression loses detail, so "
                 "test errors run higher than on the official pixels the paper used.")
  if any("synthetic" in name for name in names):
    notes.append("Runs on `synthetic` data (noise with random labels) check the machinery "
                 "only; their errors mean nothing.")
  return notes


def write_report(sweep_dir: epath.PathLike, out: epath.PathLike,
                 layer_responses: bool = True) -> epath.Path:
  """Writes out/report.md and its figures; returns the report's path."""
  sweep_dir, out = epath.Path(sweep_dir), epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  record = read_sweep_record(sweep_dir)
  members = find_members(sweep_dir)
  protocol = record.get("eval_protocol", "center")
  rows = table_rows(members, protocol)
  lines = [f"# Sweep `{record.get('sweep', sweep_dir.name)}`", ""]
  if record.get("description"):
    lines += [record["description"] + ".", ""]
  lines += [_schedule_line(record), ""]
  if record.get("overrides"):
    lines += ["Config overrides: " + ", ".join(f"`{o}`" for o in record["overrides"]) + ".", ""]
  lines += [f"- {note}" for note in _dataset_notes(rows)] + [""]
  lines += [
      "## Results", "",
      "Training error: the last logged value (mean over finished runs). Test error: top-1 (%) "
      f"of the final checkpoint by {PROTOCOL_NAMES[protocol]} testing, as the paper's, mean ± "
      "sample std over finished runs. Δ: ours minus the paper's.",
      "",
      "| Config | Model | Dataset | Params | Runs finished | Train error (%) | Test error (%) "
      "| Paper (%) | Δ |",
      "|---|---|---|---|---|---|---|---|---|"]
  lines += [_format_row(row) for row in rows] + [""]
  unevaluated = [m for m in members if m["summary"] and test_error(m, protocol) is None]
  if unevaluated:
    lines += [f"Trained, not yet tested by {PROTOCOL_NAMES[protocol]} testing (not counted above; "
              "`python -m experiments.sweeps ... --run` evaluates them): "
              + ", ".join(f"{m['config']} seed {m['seed']}" for m in unevaluated) + ".", ""]
  warmed = [m for m in members if m["warmup_end"]]
  if warmed:
    lines += ["## Warm-up (Sec. 4.2)", "",
              "Learning rate 0.01 until the training error, the mean of the last "
              "`warmup_window` batches, is below 80% (the paper: \"about 400 iterations\").", "",
              "| Run | Warm-up ended after iteration | Training error then (%) |", "|---|---|---|"]
    lines += [f"| {m['config']} seed {m['seed']} | {m['warmup_end']['step']} | "
              f"{m['warmup_end']['top1_error']:.2f} |" for m in warmed] + [""]

  lines += ["## Training curves", ""]
  if plot_curves(members, out / "curves.png"):
    lines += ["Training error dashed and thin, test error bold, against iterations "
              "(the lowest seed of each config), as in Figs. 1, 4 and 6.", "",
              "![training curves](curves.png)", ""]
  else:
    lines += ["No metrics logged yet.", ""]

  lines += ["## Layer responses (Fig. 7)", ""]
  responses, datasets = {}, {}
  for member in sorted(members, key=lambda m: m["seed"]):
    if (layer_responses and member["config"] not in responses
        and _has_checkpoints(member["workdir"])):
      responses[member["config"]] = trained_layer_responses(member["workdir"], datasets)
  if responses:
    plot_layer_responses(responses, out / "layer_responses.png")
    lines += [f"Std of each 3x3 layer's output after BN, before addition and ReLU, over "
              f"up to {LAYER_RESPONSE_IMAGES} evaluation images, from the newest checkpoint of each "
              "config's lowest seed (CIFAR: layer 1 is the stem conv). Plain nets dashed.", "",
              "![layer responses](layer_responses.png)", ""]
  else:
    lines += ["No checkpoints to measure.", ""]
  path = out / "report.md"
  path.write_text("\n".join(lines))
  return path


def _define_flags() -> None:
  flags.DEFINE_string("sweep_dir", None, "The sweep's --workdir.")
  flags.DEFINE_string("out", None, "Where report.md and its figures go.")
  flags.DEFINE_bool("layer_responses", True,
                    "Restore checkpoints and plot Fig. 7 (needs the dataset).")


def main(argv: list[str]) -> None:
  del argv  # No positional arguments (cli.run).
  for name in ("sweep_dir", "out"):
    if not flags.FLAGS[name].value:
      cli.fail(f"--{name} is missing; e.g. python -m resnet_jax.tools.report "
               "--sweep_dir=/runs/table6 --out=/runs/table6/report")
  print(write_report(flags.FLAGS.sweep_dir, flags.FLAGS.out, flags.FLAGS.layer_responses))


if __name__ == "__main__":
  cli.run(main, _define_flags)
