"""The launch helper's commands: a TPU pod slice, a 2-node Slurm GPU job, sweeps over a fleet."""
import json

import pytest

from experiments import launch

POD = ["--target=tpu-pod", "--name=resnet", "--zone=us-central2-b", "--accelerator=v4-32",
       "--config=configs/imagenet_resnet50.py", "--workdir=gs://bucket/runs/r50",
       "--override=dataset.data_dir=gs://bucket/tfds", "--print"]


def printed(capsys, argv):
  assert launch.main(argv) == 0
  return capsys.readouterr().out


def test_tpu_pod_slice_creates_sets_up_and_trains_on_every_worker(capsys):
  argv = POD + ["--stages=create,setup,train", "--repo=https://github.com/me/resnet_jax.git"]
  assert printed(capsys, argv).splitlines() == [
      "gcloud compute tpus tpu-vm create resnet --zone=us-central2-b --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base",
      "gcloud compute tpus tpu-vm ssh resnet --zone=us-central2-b --worker=all "
      "--command='sudo apt-get update -q && sudo apt-get install -y -q python3.11-venv && "
      "([ -d resnet_jax ] || git clone https://github.com/me/resnet_jax.git resnet_jax) && "
      "cd resnet_jax && python3.11 -m venv .venv && .venv/bin/pip install -e \".[train,tpu]\"'",
      "gcloud compute tpus tpu-vm ssh resnet --zone=us-central2-b --worker=all "
      "--command='cd resnet_jax && .venv/bin/python -m resnet_jax.main "
      "--config=configs/imagenet_resnet50.py --workdir=gs://bucket/runs/r50 "
      "--config.dataset.data_dir=gs://bucket/tfds'",
  ]


def test_single_tpu_vm_runs_on_its_one_host(capsys):
  argv = [a.replace("tpu-pod", "tpu-vm").replace("v4-32", "v5litepod-8") for a in POD]
  assert printed(capsys, argv + ["--stages=create"]) == (
      "gcloud compute tpus tpu-vm create resnet --zone=us-central2-b "
      "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite\n")
  assert printed(capsys, argv).startswith(
      "gcloud compute tpus tpu-vm ssh resnet --zone=us-central2-b --command='cd resnet_jax && ")


def test_two_node_slurm_job_runs_one_process_per_gpu_with_the_scaled_learning_rate(capsys):
  argv = ["--target=slurm", "--nodes=2", "--gpus_per_node=8", "--stages=setup,train",
          "--config=configs/imagenet_resnet50.py", "--workdir=/shared/runs/r50",
          "--batch_size=1024", "--print"]
  assert printed(capsys, argv) == "\n".join([
      'python3.11 -m venv .venv && .venv/bin/pip install -e ".[train,cuda13]"',
      "sbatch <<'EOF'",
      "#!/bin/bash",
      "#SBATCH --job-name=imagenet_resnet50",
      "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=8",
      "#SBATCH --gpus-per-node=8",
      "srun .venv/bin/python -m resnet_jax.main --config=configs/imagenet_resnet50.py "
      "--workdir=/shared/runs/r50 --config.batch_size=1024 --config.learning_rate=0.4",
      "EOF",
  ]) + "\n"


def test_linear_scaling_rule_per_dataset():
  assert launch.scaled_batch(["configs/cifar_resnet110.py"], 512) == [
      "batch_size=512", "learning_rate=0.4"]  # 0.1 x 512 / 128
  assert launch.scaled_batch(["configs/imagenet_resnet18.py", "configs/imagenet_resnet34.py"],
                             128) == ["batch_size=128", "learning_rate=0.05"]  # 0.1 x 128 / 256
  with pytest.raises(ValueError, match="different learning rates"):
    launch.scaled_batch(["configs/cifar_resnet20.py", "configs/imagenet_resnet18.py"], 256)


def test_sweep_gives_each_unfinished_member_its_own_tpu_vm(capsys, tmp_path):
  finished = tmp_path / "cifar_plain20" / "seed1"
  finished.mkdir(parents=True)
  (finished / "summary.json").write_text("{}")
  argv = ["--target=tpu-vm", "--name=fleet", "--zone=europe-west4-a", "--sweep=fig1",
          "--seeds=2", f"--workdir={tmp_path}", "--print"]
  lines = printed(capsys, argv).splitlines()
  assert [line.split()[5] for line in lines] == [
      "fleet-cifar-plain20-s0", "fleet-cifar-plain56-s0", "fleet-cifar-plain56-s1"]
  assert lines[0].endswith(
      f"--command='cd resnet_jax && .venv/bin/python -m resnet_jax.main "
      f"--config=configs/cifar_plain20.py --workdir={tmp_path}/cifar_plain20/seed0 "
      "--config.seed=0'")
  assert json.loads((tmp_path / "sweep.json").read_text())["sweep"] == "fig1"


def test_sweep_over_gpu_hosts_and_slurm_jobs(capsys, tmp_path):
  sweep = ["--sweep=fig1", f"--workdir={tmp_path}", "--print"]
  lines = printed(capsys, ["--target=gpu-host", "--hosts=gpu1,gpu2"] + sweep).splitlines()
  assert lines == [f"ssh gpu{i + 1} 'cd resnet_jax && .venv/bin/python -m resnet_jax.main "
                   f"--config=configs/{c}.py --workdir={tmp_path}/{c}/seed0 --config.seed=0'"
                   for i, c in enumerate(["cifar_plain20", "cifar_plain56"])]
  jobs = printed(capsys, ["--target=slurm", "--nodes=1", "--stages=setup,train"] + sweep)
  assert jobs.count("sbatch <<'EOF'") == 2 and "#SBATCH --job-name=cifar_plain56-s0" in jobs
  assert jobs.count("pip install") == 1  # One shared checkout to set up.


def test_unusable_requests_are_refused(capsys, tmp_path):
  assert launch.main(["--target=gpu-host", "--sweep=fig1", f"--workdir={tmp_path}", "--print"]) == 2
  assert "2 run(s) to launch on gpu-host need --hosts with one host each, got 0" in (
      capsys.readouterr().err)
  with pytest.raises(SystemExit):
    launch.main(POD[1:] + ["--target=gpu-host", "--stages=create"])
  assert "no stage(s) ['create']" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    launch.main(POD + ["--stages=setup"])
  assert "needs --repo" in capsys.readouterr().err
