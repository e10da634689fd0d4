"""``python -m vinf_engine generate``: bad input refused the same way on every rank, a real
torchrun launch, a rank killed mid-run, the run resumed, and a rank that hangs.

The bad-input table runs on 2 real gloo ranks in one process group, case after case: each
case must exit 2 with the same message on both ranks, write nothing, and leave the group
usable for the next (the last case is a valid run that must succeed)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from gen_helpers import HW, cli_cases_rank, save_tiny_pipeline
from helpers import run_ranks
from vinf_engine.video import read_video

WORLD = 2
STEPS = 16          # the launch tests' run: long enough to be interrupted mid-way


def _base(model, out, **over):
    args = {"--model": model, "--prompt": "the cat", "--frames": "4", "--steps": "2",
            "--height": str(HW[0]), "--width": str(HW[1]), "--out": out, "--timeout": "30"}
    args.update(over)
    argv = ["generate", "--quiet"]
    for k, v in args.items():
        if v is None:
            continue
        argv += [k] if v is True else [k, v]
    return argv


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_pipeline(str(tmp_path_factory.mktemp("model")))


def _args(model, out, steps=STEPS, **over):
    """The run that the launch tests interrupt and resume (and the table runs whole)."""
    return _base(model, out, **{"--frames": "6", "--steps": str(steps), "--seed": "4",
                                "--scheduler": "dpm++sde", "--window": "2", "--num-global": "2",
                                "--save-latents": out[:-4] + ".pt", **over})


def _unsupported_models(w, model) -> dict:
    """Model folders that must be refused: name -> path."""
    # Folders that are not a supported pipeline.
    (w / "empty").mkdir()
    sd = w / "sd"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (sd / sub).mkdir(parents=True)
    (sd / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}))
    (sd / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    broken = w / "broken"
    shutil.copytree(model, broken)
    weights = next(p for p in (broken / "unet").iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:200])
    # Weights that load but hold NaN; a config that does not fit its weights.
    nan = w / "nan"
    shutil.copytree(model, nan)
    from safetensors.torch import load_file, save_file
    wfile = next(p for p in (nan / "unet").iterdir() if p.suffix == ".safetensors")
    tensors = load_file(str(wfile))
    tensors[sorted(tensors)[0]].fill_(float("nan"))
    save_file(tensors, str(wfile))
    mismatch = w / "mismatch"
    shutil.copytree(model, mismatch)
    ucfg = json.loads((mismatch / "unet" / "config.json").read_text())
    ucfg["block_out_channels"] = [16, 48]
    (mismatch / "unet" / "config.json").write_text(json.dumps(ucfg))
    return dict(empty=w / "empty", sd=sd, broken=broken, nan=nan, mismatch=mismatch)


def _bad_files(w) -> dict:
    """Checkpoints, prompt files and outputs that must be refused or survive: name -> path."""
    # Checkpoints that are all corrupt (this run's names, garbage inside).
    ck_corrupt = w / "ck_corrupt"
    ck_corrupt.mkdir()
    for r in range(WORLD):
        (ck_corrupt / f"rank{r:05d}-of-{WORLD:05d}.step000001.pt").write_bytes(b"PK\x03\x04 not a zip")
    # Prompt files.
    empty_scene = w / "empty_scene.txt"
    empty_scene.write_text("0: the cat\n2:\n")
    good_prompts = w / "prompts.txt"
    good_prompts.write_text("0: the cat\n2: a dog\n")
    binary = w / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    # An existing output that must survive, an output path that is a folder.
    existing = w / "out" / "existing.mp4"
    existing.write_bytes(b"precious")
    (w / "out" / "folder.mp4").mkdir()
    ck, ck_empty = str(w / "ck"), str(w / "ck_empty")
    os.makedirs(ck_empty)
    return dict(ck_corrupt=ck_corrupt, empty_scene=empty_scene, good_prompts=good_prompts,
                binary=binary, existing=existing, ck=ck, ck_empty=ck_empty)


def _input_cases(model, out, w, f) -> dict:
    """Bad models, sizes, counts, prompt files and outputs: name -> (argv per rank, needle)."""
    def same(**over):
        return [_base(model, out, **over)] * WORLD

    P = "--prompt"
    return {
        "no model folder": (same(**{"--model": str(w / "nope")}), "does not exist"),
        "folder without a pipeline": (same(**{"--model": str(f["empty"])}),
                                      "is not a diffusers pipeline folder (no model_index.json)"),
        "unsupported pipeline": (same(**{"--model": str(f["sd"])}),
                                 "holds a StableDiffusionPipeline whose unet is UNet2DConditionModel"),
        "truncated weights": (same(**{"--model": str(f["broken"])}), "cannot load unet"),
        "frames < ranks": (same(**{"--frames": "1"}), "frames (1) is fewer than ranks (2)"),
        "zero frames": (same(**{"--frames": "0"}), "frames must be a positive integer, got 0"),
        "frames not a number": (same(**{"--frames": "many"}), "frames must be a positive integer, got 'many'"),
        "height the VAE/UNet cannot take": (same(**{"--height": "18"}),
                                            "height 18 is not a multiple of 4: the VAE downsamples by 2"),
        "width the VAE/UNet cannot take": (same(**{"--width": "30"}), "width 30 is not a multiple of 4"),
        "zero steps": (same(**{"--steps": "0"}), "steps must be a positive integer, got 0"),
        "negative steps": (same(**{"--steps": "-3"}), "steps must be a positive integer, got -3"),
        "negative guidance": (same(**{"--guidance": "-1"}), "guidance scale must be a finite number >= 0"),
        "missing prompt file": (same(**{P: None, "--prompt-file": str(w / "nope.txt")}),
                                "nope.txt' does not exist"),
        "prompt file not text": (same(**{P: None, "--prompt-file": str(f["binary"])}), "is not UTF-8 text"),
        "prompt file is a folder": (same(**{P: None, "--prompt-file": str(w / "empty")}), "is a directory"),
        "prompt file missing on rank 1 only": (
            [_base(model, out, **{P: None, "--prompt-file": str(f["good_prompts"])}),
             _base(model, out, **{P: None, "--prompt-file": str(w / "gone.txt")})],
            "rank 1: prompt file"),
        "prompt and prompt file": (same(**{"--prompt-file": str(f["good_prompts"])}), "not both"),
        "output folder missing": (same(**{"--out": str(w / "nodir" / "v.mp4")}),
                                  "output directory"),
        "output under a file": (same(**{"--out": str(f["binary"] / "v.mp4")}), "output directory"),
        "output is a folder": (same(**{"--out": str(w / "out" / "folder.mp4")}), "is a directory"),
        "output exists": (same(**{"--out": str(f["existing"])}), "already exists (pass --overwrite"),
        "output not mp4": (same(**{"--out": str(w / "out" / "v.avi")}), "must end in .mp4"),
    }


def _settings_cases(model, out, w, f) -> dict:
    """Bad settings, checkpoints and weights: name -> (argv per rank, needle)."""
    def same(**over):
        return [_base(model, out, **over)] * WORLD

    P, ck = "--prompt", f["ck"]
    return {
        "ranks with different arguments": (
            [_base(model, out), _base(model, out, **{"--steps": "3"})],
            "ranks were started with different arguments (steps: rank 0: 2, rank 1: 3)"),
        "unknown scheduler": (same(**{"--scheduler": "fancy"}), "unknown scheduler 'fancy'"),
        "loopback comm mode (timing only)": (same(**{"--comm-mode": "loopback"}),
                                             "comm mode must be one of ['overlap', 'blocking', 'stale']"),
        "negative window": (same(**{"--window": "-1"}), "window must be a non-negative int"),
        "fps on a model without fps input": (same(**{"--fps": "8"}), "--fps conditions VideoCrafter2 only"),
        "bad dtype": (same(**{"--dtype": "float8"}), "dtype must be one of"),
        "resume without checkpoint dir": (same(**{"--resume": True}), "--resume needs --checkpoint-dir"),
        "resume with nothing to resume": (same(**{"--checkpoint-dir": f["ck_empty"], "--resume": True}),
                                          "--resume: no checkpoint in"),
        "checkpoint from another config": (
            same(**{"--checkpoint-dir": ck, "--resume": True, "--seed": "9", "--steps": "3"}),
            "made with different settings (seed: checkpoint 1, now 9)"),
        "checkpoint dir already in use": (same(**{"--checkpoint-dir": ck, "--steps": "3"}),
                                          "already holds a checkpoint"),
        "missing required argument": ([["generate", "--model", model, "--prompt", "x"]] * WORLD,
                                      "the following arguments are required: --frames"),
        "seed past 64 bits": (same(**{"--seed": str(2 ** 64)}), "seed must be an integer in [0, 2**64)"),
        "steps past the scheduler": (same(**{"--steps": "2000"}),
                                     "steps 2000 is more than the scheduler's 1000 training timesteps"),
        "report is a folder": (same(**{"--report": str(w / "empty")}), "--report path"),
        "checkpoint dir under a file": (same(**{"--checkpoint-dir": str(f["binary"] / "ck")}),
                                        "is a file, not a directory"),
        "scene with no text": (same(**{P: None, "--prompt-file": str(f["empty_scene"])}),
                               "line 2: the scene at frame 2 has no text"),
        "weights holding NaN": (same(**{"--model": str(f["nan"])}), "weights hold NaN or Inf in 1 tensor"),
        "config that does not fit its weights": (
            same(**{"--model": str(f["mismatch"])}), "its config does not match its weights: "),
        "every checkpoint corrupt": (same(**{"--checkpoint-dir": str(f["ck_corrupt"]), "--resume": True}),
                                     "is unreadable (not a complete checkpoint file: truncated or corrupt)"),
    }


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_model):
    """name -> (argv per rank, what the message must contain); the results of running them
    all, then a valid run (the reference video of the launch tests), on 2 ranks."""
    w = tmp_path_factory.mktemp("cli")
    model = tiny_model
    out = str(w / "out" / "video.mp4")
    os.makedirs(w / "out")
    f = {**_unsupported_models(w, model), **_bad_files(w)}
    cases = {**_input_cases(model, out, w, f), **_settings_cases(model, out, w, f)}
    names = list(cases)
    reference = str(w / "reference" / "ref.mp4")
    os.makedirs(os.path.dirname(reference))
    argvs = [(n, cases[n][0]) for n in names] + [("valid run", [_args(model, reference)] * WORLD)]
    setup = dict(model=model, out=str(w / "setup.mp4"), checkpoint_dir=f["ck"])
    t0 = time.perf_counter()
    results = run_ranks(cli_cases_rank, WORLD, argvs, setup, timeout=300)
    wall = time.perf_counter() - t0
    return dict(cases=cases, results=results, out=out, existing=f["existing"], w=w, model=model,
                ck=f["ck"], wall=wall, reference=reference)


def test_the_table_has_at_least_15_cases(table):
    assert len(table["cases"]) >= 15


@pytest.mark.parametrize("name", [
    "no model folder", "folder without a pipeline", "unsupported pipeline", "truncated weights",
    "frames < ranks", "zero frames", "frames not a number", "height the VAE/UNet cannot take",
    "width the VAE/UNet cannot take", "zero steps", "negative steps", "negative guidance",
    "missing prompt file", "prompt file not text", "prompt file is a folder",
    "prompt file missing on rank 1 only", "prompt and prompt file", "output folder missing",
    "output under a file", "output is a folder", "output exists", "output not mp4",
    "ranks with different arguments", "unknown scheduler", "negative window",
    "fps on a model without fps input", "bad dtype", "resume without checkpoint dir",
    "resume with nothing to resume", "checkpoint from another config",
    "checkpoint dir already in use", "missing required argument", "seed past 64 bits",
    "steps past the scheduler", "report is a folder", "checkpoint dir under a file",
    "scene with no text", "weights holding NaN", "config that does not fit its weights",
    "every checkpoint corrupt"])
def test_bad_input_is_refused_on_every_rank(table, name):
    _, needle = table["cases"][name]
    messages = []
    for rank in range(WORLD):
        code, err, seconds = table["results"][rank][name]
        assert code == 2, (rank, code, err)
        assert needle in err, (rank, err)
        assert seconds < 20, (rank, seconds)                   # refused, not timed out
        # The same message on every rank, up to the "[rank r/2]" prefix; one line, short,
        # and never advice to switch a safety check off.
        messages.append(err.replace(f"[rank {rank}/{WORLD}]", "[rank]"))
        assert (err.count("\n") == 1 or name == "missing required argument") and len(err) < 2000, err
        assert "weights_only" not in err and "ignore_mismatched_sizes" not in err, err
    assert messages[0] == messages[1]
    # Nothing written: no video, no partial file; the existing file is untouched.
    assert sorted(os.listdir(os.path.dirname(table["out"]))) == ["existing.mp4", "folder.mp4"]
    assert table["existing"].read_bytes() == b"precious"


def test_the_group_still_works_after_the_refusals(table):
    for rank in range(WORLD):
        code, err, _ = table["results"][rank]["valid run"]
        assert code == 0, err
    video, meta = read_video(table["reference"])
    assert video.shape == (6, HW[0], HW[1], 3) and meta["size"] == (HW[1], HW[0])


def test_resume_on_another_number_of_ranks_is_refused(table, capsys):
    # The table's 2-rank checkpoint, resumed by a single process (this one).
    from vinf_engine.cli import main
    out = table["w"] / "out" / "one.mp4"
    code = main(_base(table["model"], str(out), **{"--checkpoint-dir": table["ck"],
                                                   "--resume": True, "--seed": "1", "--steps": "3"}))
    err = capsys.readouterr().err
    assert code == 2 and "was written by 2 rank(s); this run has 1" in err, err
    assert not out.exists()


# ---------------------------------------------------------------- real launches
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(argv, world, tmp, tag):
    """``world`` ranks of ``python -m vinf_engine`` with torchrun's environment variables."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = _env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r, LOCAL_WORLD_SIZE=world,
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "vinf_engine", *argv], env=env,
            stdout=open(tmp / f"{tag}{r}.out", "w"), stderr=open(tmp / f"{tag}{r}.err", "w")))
    return procs


def _wait_for_step(ck, rank, world, step, procs, limit=120):
    """Until ``rank`` has checkpointed a step >= ``step`` (it keeps only its two newest)."""
    import re
    pat = re.compile(rf"rank{rank:05d}-of-{world:05d}\.step(\d+)\.pt$")
    t0 = time.monotonic()
    while True:
        names = os.listdir(ck) if os.path.isdir(ck) else []
        if any(m and int(m.group(1)) >= step for m in map(pat.match, names)):
            return
        assert time.monotonic() - t0 < limit, f"rank {rank} never checkpointed step {step}"
        assert all(p.poll() is None for p in procs), "a rank exited before the signal"
        time.sleep(0.01)


def _signal_rank1_after(run, tmp_path, tag, ck, step, sig):
    """Launch 2 ranks, send ``sig`` to rank 1 once every rank checkpointed ``step``, and
    return rank 0's exit code, how long it took to exit after the signal, and its stderr."""
    procs = _launch(run, 2, tmp_path, tag)
    try:
        _wait_for_step(ck, 1, 2, step, procs)
        procs[1].send_signal(sig)
        t0 = time.monotonic()
        code0 = procs[0].wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.wait()
    return code0, waited, (tmp_path / f"{tag}0.err").read_text()


def test_a_killed_rank_then_resume_under_torchrun(table, tiny_model, tmp_path):
    # 1. Two ranks launched with torchrun's environment; rank 1 is killed (SIGKILL) once it
    #    has checkpointed step 3. Rank 0 must fail at once (the connection closes), say why,
    #    exit 1, and write nothing.
    out = str(tmp_path / "video.mp4")
    ck = str(tmp_path / "ck")
    run = _args(tiny_model, out, **{"--checkpoint-dir": ck, "--checkpoint-every": "1",
                                    "--timeout": "10"})
    code0, waited, err0 = _signal_rank1_after(run, tmp_path, "kill", ck, 3, signal.SIGKILL)
    assert code0 == 1, err0
    assert waited < 10 + 15, waited                       # within the timeout (+ teardown)
    assert "rank 0: generation failed during denoising (step" in err0, err0
    assert "a peer rank died" in err0 or "another rank died" in err0, err0
    assert not os.path.exists(out) and not os.path.exists(out[:-4] + ".pt")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["ck"] + [f"kill{r}.{s}" for r in (0, 1) for s in ("out", "err")])

    # 2. The same command with --resume, under torchrun itself: the video and latents of the
    #    uninterrupted 2-rank run (the table's valid run), bit for bit; the checkpoint cleared.
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "vinf_engine",
         *run, "--resume"],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout[p.stdout.index("{"):])
    assert report["ranks"] == 2 and report["frames"] == 6 and report["backend"] == "gloo"
    assert report["resumed_from_step"] >= 3 and report["steps_run"] == STEPS - report["resumed_from_step"]
    assert report["timings_s"]["denoise"] > 0 and report["frame_steps_per_s"] > 0
    assert len(report["per_rank"]) == 2 and report["comm_total"]["bytes_sent"] > 0
    ref = table["reference"]
    # bitwise: the same 2-rank run, resumed, repeats its operations on the same shapes
    assert open(out, "rb").read() == open(ref, "rb").read()
    assert torch.equal(torch.load(out[:-4] + ".pt")["latents"], torch.load(ref[:-4] + ".pt")["latents"])
    assert os.listdir(ck) == []


def test_a_hung_rank_makes_the_others_fail_within_the_timeout(tiny_model, tmp_path):
    out = str(tmp_path / "video.mp4")
    ck = str(tmp_path / "ck")
    run = _args(tiny_model, out, **{"--checkpoint-dir": ck, "--checkpoint-every": "1",
                                    "--timeout": "4"})
    code0, waited, err0 = _signal_rank1_after(run, tmp_path, "hang", ck, 2, signal.SIGSTOP)
    assert code0 == 1, err0
    assert waited < 4 + 15, waited
    assert "rank 0: generation failed during" in err0, err0
    assert "within 4 s" in err0 or "timed out" in err0.lower(), err0
    assert not os.path.exists(out)


def test_two_launchers_of_two_ranks_each_as_two_nodes(tiny_model, tmp_path):
    """Multi-node, simulated on one host: two ``torchrun --nnodes 2 --nproc-per-node 2``
    launchers meet at a c10d rendezvous on 127.0.0.1, and their 4 ranks generate the latents
    one process does (gloo across the "nodes" over loopback)."""
    out = str(tmp_path / "nodes.mp4")
    one = str(tmp_path / "one.mp4")
    run = _base(tiny_model, out, **{"--frames": "8", "--steps": "3", "--seed": "7",
                                    "--window": "2", "--num-global": "2",
                                    "--save-latents": out[:-4] + ".pt",
                                    "--report": str(tmp_path / "report.json")})
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
         "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
         "--rdzv-id", "vinf-test", "-m", "vinf_engine", *run],
        env=_env(GLOO_SOCKET_IFNAME="lo"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ranks"] == 4 and report["backend"] == "gloo"
    assert [r["frames"] for r in report["per_rank"]] == [2, 2, 2, 2]
    single = _base(tiny_model, one, **{"--frames": "8", "--steps": "3", "--seed": "7",
                                       "--window": "2", "--num-global": "2",
                                       "--save-latents": one[:-4] + ".pt"})
    p = subprocess.run([sys.executable, "-m", "vinf_engine", *single], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a = torch.load(out[:-4] + ".pt")["latents"].double()
    b = torch.load(one[:-4] + ".pt")["latents"].double()
    assert a.shape == b.shape and ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    assert read_video(out)[0].shape == read_video(one)[0].shape
