"""The README's "Trained ResNets" blocks run as written: a run of ours and akamaster's weights
loaded in a user's code, and his weights scored by the evaluator from the command line. Only
the paths change, to a run and a `.th` file made here."""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import akamaster_resnet
import processes
from resnet_jax.configs import cifar_resnet20
from resnet_jax.training import loop

README = os.path.join(processes.REPO, "README.md")


def blocks(language: str) -> list[str]:
  """The `language` code blocks of the README's "Trained ResNets" paragraph."""
  text = open(README, encoding="utf-8").read()
  section = text[text.index("**Trained ResNets.**"):]
  section = section[:section.index("\n**", 1)]
  return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """What the blocks' paths name: a run of ours (a 20-step smoke run of ResNet-8) and a .th of
  akamaster's ResNet-20 (random weights), as his trainer saves one."""
  root = tmp_path_factory.mktemp("readme")
  config = cifar_resnet20.get_config("smoke")
  config.model = "cifar_resnet8"
  loop.train_and_evaluate(config, str(root / "resnet110"))
  torch.manual_seed(0)
  net = akamaster_resnet.resnet(20, num_classes=10)
  torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
              "best_prec1": 0.0}, root / "resnet20-12fca82f.th")
  return root


def test_loading_a_run_and_akamasters_weights_in_your_code(files):
  [code] = blocks("python")
  code = code.replace('"/tmp/resnet110"', repr(str(files / "resnet110")))
  code = code.replace('"resnet20-12fca82f.th"', repr(str(files / "resnet20-12fca82f.th")))
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (8, 10) and np.isfinite(namespace["logits"]).all()


def test_scoring_akamasters_weights_from_the_command_line(files, tmp_path):
  [command] = blocks("bash")
  args = shlex.split(command.replace("\\\n", " "))
  assert args[:3] == ["python", "-m", "resnet_jax.training.evaluate"]
  # The config's CIFAR-10 is TFDS's, not prepared here: its smoke variant's synthetic images.
  args = [sys.executable, *args[1:]]
  args = [{"--config=cifar_resnet20": "--config=cifar_resnet20:smoke",
           "--weights=resnet20-12fca82f.th": f"--weights={files}/resnet20-12fca82f.th",
           "--workdir=/tmp/scores": f"--workdir={tmp_path}"}.get(arg, arg) for arg in args]
  result = subprocess.run(args, cwd=processes.REPO, env=processes.environment(8),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads((tmp_path / "evaluations" / "resnet20-12fca82f.th-center.json").read_text())
  assert (record["model"], record["weights_format"], record["examples"]) == (
      "cifar_resnet20", "akamaster", 200)
  assert f"top-1 error {record['top1_error']:.2f}%" in result.stdout
