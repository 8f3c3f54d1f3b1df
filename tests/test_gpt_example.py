"""examples/train_gpt.py: its data loader, its --mode both record and summary, and the example
itself under torchrun (both modes compared, a killed rank resumed bit-identically)."""

from __future__ import annotations

import csv
import math
import random
import re
import statistics
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from .models import assert_identical
from .test_example import torchrun

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GPT = EXAMPLES / "train_gpt.py"
sys.path.insert(0, str(EXAMPLES))

import compare_modes  # noqa: E402
import text_data  # noqa: E402

TINY = [
    "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
    "--max-chars", "200000", "--bucket-cap-mb", "0.01", "--eval-every", "4", "--log-every", "4",
    "--warmup", "2",
]


# -- the data loader ---------------------------------------------------------------------------


def _tree(root: Path, names: list[str]) -> dict[str, str]:
    """Write a text file per name, in a shuffled order, and return name -> text."""
    texts = {name: f"# {name}\n" + "x = 1\n" * (i + 1) for i, name in enumerate(names)}
    order = list(names)
    random.Random(0).shuffle(order)
    for name in order:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(texts[name])
    return texts


def test_folder_is_read_in_sorted_order_and_split_by_file(tmp_path):
    names = [f"pkg/m{i:02d}.txt" for i in range(15)] + ["a.txt", "b/c.txt", "z.md"]
    texts = _tree(tmp_path, names)
    # Never read: hidden folders, bytecode caches, binary files.
    _tree(tmp_path, [".git/config", "__pycache__/x.txt"])
    (tmp_path / "pkg" / "blob.bin").write_bytes(b"\x00\x01\xff")

    corpus = text_data.load_corpus(tmp_path)
    order = sorted(names)
    read = [f.name for f in corpus.train_files + corpus.val_files]
    assert sorted(read) == order
    assert [f.name for f in corpus.val_files] == [order[9]]  # every tenth file, in reading order
    assert [f.name for f in corpus.train_files] == [n for i, n in enumerate(order) if i != 9]
    assert corpus.skipped == ["pkg/blob.bin"]
    assert corpus.decode(corpus.train) == "".join(texts[n] for n in order if n != order[9])
    assert corpus.decode(corpus.val) == texts[order[9]]
    assert corpus.vocab == sorted(set("".join(texts.values())))

    again = text_data.load_corpus(tmp_path)  # deterministic: same text, same ids
    assert torch.equal(again.train, corpus.train) and again.fingerprint() == corpus.fingerprint()


def test_cap_cuts_the_text_in_reading_order(tmp_path):
    names = [f"f{i:02d}.txt" for i in range(30)]
    texts = _tree(tmp_path, names)
    full = "".join(texts[n] for n in names)
    cap = len(full) // 2 + 3
    corpus = text_data.load_corpus(tmp_path, max_chars=cap)
    files = sorted(corpus.train_files + corpus.val_files, key=lambda f: f.name)
    assert sum(f.chars for f in files) == cap == len(corpus.train) + len(corpus.val)
    assert "".join(texts[f.name][: f.chars] for f in files) == full[:cap]
    assert files[-1].chars < len(texts[files[-1].name])  # the last file read was cut


def test_single_file_is_split_by_position(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefghij" * 50)
    corpus = text_data.load_corpus(path)
    assert corpus.decode(corpus.train) + corpus.decode(corpus.val) == path.read_text()
    assert len(corpus.val) == 50
    assert [f.name for f in corpus.val_files] == ["one.txt"]


def test_default_corpus_is_the_standard_library_source():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = text_data.load_corpus(max_chars=400_000)
    files = corpus.train_files + corpus.val_files
    assert corpus.root == stdlib and len(corpus.val_files) >= 1
    assert all(f.name.endswith(".py") and "site-packages" not in f.name for f in files)
    listed = text_data.list_files(stdlib, (".py",))
    first = [p.relative_to(stdlib).as_posix() for p in listed[: len(files) + len(corpus.skipped)]]
    assert sorted(f.name for f in files) == sorted(n for n in first if n not in corpus.skipped)
    assert len(corpus.train) + len(corpus.val) == 400_000
    first_file = (stdlib / files[0].name).read_text()
    assert corpus.decode(corpus.train[:200]) == first_file[:200]


def test_batches_depend_on_seed_step_rank_and_micro_step_only(tmp_path):
    corpus = text_data.load_corpus(max_chars=100_000)
    x, y = corpus.batch("train", 0, 5, 1, 0, 4, 16)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets: the next character
    assert all(torch.equal(a, b) for a, b in zip((x, y), corpus.batch("train", 0, 5, 1, 0, 4, 16)))
    for other in [(1, 5, 1, 0), (0, 6, 1, 0), (0, 5, 0, 0), (0, 5, 1, 1)]:
        assert not torch.equal(corpus.batch("train", *other, 4, 16)[0], x), other
    v, _ = corpus.batch("val", 0, 0, 0, 0, 4, 16)
    windows = corpus.val.unfold(0, 16, 1)  # every window of the validation text
    assert all(bool((windows == row).all(1).any()) for row in v)


def test_bad_data_is_refused_with_the_path(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder: '.*missing'"):
        text_data.load_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no UTF-8 text found under '.*empty'"):
        text_data.load_corpus(tmp_path / "empty")
    with pytest.raises(ValueError, match="max_chars must be positive, got 0"):
        text_data.load_corpus(tmp_path, max_chars=0)
    (tmp_path / "tiny.txt").write_text("abc")
    corpus = text_data.load_corpus(tmp_path / "tiny.txt")
    with pytest.raises(ValueError, match="too few for windows of block_size=16"):
        corpus.batch("train", 0, 0, 0, 0, 2, 16)


# -- the --mode both record and summary --------------------------------------------------------


def _comparison() -> compare_modes.Comparison:
    c = compare_modes.Comparison(warmup=1)
    rows = [(3.0, 3.0, 0.50, 0.20), (2.5, 2.5, 0.09, 0.10), (2.0, 2.25, 0.08, 0.12), (1.5, 1.5, 0.10, 0.11)]
    for step, (lo, lp, so, sp) in enumerate(rows, start=1):
        c.add(step, {"overlap": lo, "post": lp}, {"overlap": so, "post": sp})
    c.add_val(0, {"overlap": 4.0, "post": 4.0})
    c.add_val(4, {"overlap": 1.75, "post": 1.5})
    return c


def test_summary_of_both_modes():
    s = _comparison().summary()
    assert s["max_loss_diff"] == 0.25 and s["steps"] == 4
    assert s["val_overlap"] == 1.75 and s["val_post"] == 1.5  # the last validation
    assert s["median_ms_overlap"] == pytest.approx(90.0) and s["median_ms_post"] == pytest.approx(110.0)
    assert s["ratio"] == pytest.approx(90.0 / 110.0)


def test_csv_and_plot(tmp_path, monkeypatch):
    c = _comparison()
    rows = list(csv.DictReader(open(c.write_csv(tmp_path / "run" / "both.csv"))))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[2]["loss_post"]) == 2.25 and float(rows[0]["ms_overlap"]) == 500.0
    assert rows[3]["val_overlap"] == "1.75" and rows[0]["val_post"] == ""

    pytest.importorskip("matplotlib")
    png = compare_modes.plot(c, tmp_path / "run" / "both.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were missing
    assert compare_modes.plot(c, tmp_path / "other.png") is None
    assert not (tmp_path / "other.png").exists()


# -- the example under torchrun ----------------------------------------------------------------


def _both_summary(out: str) -> dict[str, float]:
    patterns = {
        "max_diff": r"largest \|overlap - post\| (\S+) over (\d+) steps",
        "val": r"validation loss: +overlap (\S+) \| post (\S+)",
        "median": r"median step: +overlap (\S+) ms \| post (\S+) ms \| overlap/post (\S+)",
    }
    fields = {}
    for key, pattern in patterns.items():
        m = re.search(pattern, out)
        assert m, f"no {key!r} in the summary:\n{out[-3000:]}"
        fields[key] = [float(g) for g in m.groups()]
    return fields


@pytest.mark.timeout(150)
def test_both_modes_train_identically_and_are_summarised(tmp_path):
    data = tmp_path / "data"
    _tree(data, [f"src/m{i:02d}.py" for i in range(12)] + ["README.txt"])
    (data / "src" / "m03.py").write_text((EXAMPLES / "train_gpt.py").read_text())  # some real text
    steps = 8
    out = torchrun(
        *TINY, "--mode", "both", "--steps", str(steps), "--accumulate", "2", "--bf16", "--clip", "0",
        "--data", str(data), "--out-dir", "out", cwd=tmp_path, timeout=130, script=GPT,
    )
    assert "data: 12 train files" in out and "1 validation files" in out
    assert re.search(r"^step +4/8 \| loss [\d.]+ / [\d.]+ \| .* ms \| .* tok/s \| ETA \d+:\d\d", out, re.M), out[-3000:]
    s = _both_summary(out)
    # The same kernels on the same averaged gradients: the same loss at every step.
    assert s["max_diff"] == [0.0, steps]
    assert "identical at every step" in out
    assert s["val"][0] == s["val"][1] and math.isfinite(s["val"][0])

    rows = list(csv.DictReader(open(tmp_path / "out" / "both.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    losses = [(float(r["loss_overlap"]), float(r["loss_post"])) for r in rows]
    assert all(a == b and math.isfinite(a) for a, b in losses)
    assert losses[-1][0] < losses[0][0]  # it learns
    medians = [statistics.median(float(r[f"ms_{m}"]) for r in rows[2:]) for m in ("overlap", "post")]
    assert s["median"][:2] == pytest.approx(medians, abs=0.051)
    assert s["median"][2] == pytest.approx(medians[0] / medians[1], abs=2e-3)
    vals = [(int(r["step"]), float(r["val_overlap"]), float(r["val_post"])) for r in rows if r["val_overlap"]]
    assert [v[0] for v in vals] == [4, 8] and all(v[1] == v[2] for v in vals)
    assert vals[-1][1] == pytest.approx(s["val"][0], abs=5e-5)
    assert (tmp_path / "out" / "both.png").exists()


@pytest.mark.timeout(150)
def test_both_modes_with_global_clipping_train_alike(tmp_path):
    steps = 8
    out = torchrun(*TINY, "--mode", "both", "--steps", str(steps), "--clip", "0.5", "--out-dir", "out",
                   cwd=tmp_path, timeout=130, script=GPT)
    assert re.search(r"^step +4/8 \| loss [\d.]+ / [\d.]+ \| norm [\d.]+ / [\d.]+ \| ", out, re.M), out[-3000:]
    m = re.search(r"clipping: +max_norm 0.5 \| clipped steps overlap (\d+) \| post (\d+) of 8", out)
    assert m, out[-3000:]
    assert m.group(1) == m.group(2) and int(m.group(1)) > 0
    s = _both_summary(out)
    # A clipped step is corrected: the same training within rounding (Adam's m / sqrt(v)
    # amplifies the correction's last bits a little over the steps).
    assert s["max_diff"][0] < 1e-3, s

@pytest.mark.timeout(240)
def test_killed_rank_resumes_bit_identical_with_two_optimizers(tmp_path):
    args = [*TINY, "--optimizer", "muon", "--steps", "12", "--checkpoint-every", "4"]
    crashed = torchrun(
        *args, "--crash-at-step", "10", "--checkpoint-dir", "D1", "--save-final", "F1",
        restarts=1, cwd=tmp_path, timeout=150, script=GPT,
    )
    assert "rank 1: crashing (SIGKILL) before step 10" in crashed
    assert "resumed from step 8 (restart attempt 1)" in crashed, crashed[-4000:]
    assert "summary: mode overlap | muon | steps 8 -> 12" in crashed

    torchrun(*args, "--checkpoint-dir", "D2", "--save-final", "F2", cwd=tmp_path, timeout=80, script=GPT)
    f1 = torch.load(tmp_path / "F1", weights_only=True)
    f2 = torch.load(tmp_path / "F2", weights_only=True)
    assert f1["step"] == 12 and len(f1["optimizer"]) == 2  # Muon and AdamW
    assert f1["optimizer"][0]["state"] and f1["optimizer"][1]["state"]
    assert_identical(f1, f2)


@pytest.mark.timeout(150)
def test_fsdp_both_modes_train_identically_with_clipping(tmp_path):
    # FSDP2 (fully_shard per block): the overlapped run clips the global norm exactly (its
    # updates wait for step() on the steps of a clipped run) and accumulates; the same loss at
    # every step as the post-backward loop.
    steps = 8
    out = torchrun(*TINY, "--fsdp", "--mode", "both", "--steps", str(steps), "--clip", "0.5",
                   "--accumulate", "2", "--out-dir", "out", cwd=tmp_path, timeout=130, script=GPT)
    m = re.search(r"clipping: +max_norm 0.5 \| clipped steps overlap (\d+) \| post (\d+) of 8", out)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0, out[-3000:]
    s = _both_summary(out)
    assert s["max_diff"] == [0.0, steps], s
    assert s["val"][0] == s["val"][1] and math.isfinite(s["val"][0])


@pytest.mark.timeout(240)
def test_fsdp_killed_rank_resumes_bit_identical(tmp_path):
    # FSDP2: every rank writes its shards of the model and of AdamW's state; the restarted job
    # loads them and ends where the uninterrupted one does, bit for bit.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    args = [*TINY, "--fsdp", "--steps", "12", "--checkpoint-every", "4"]
    crashed = torchrun(
        *args, "--crash-at-step", "10", "--checkpoint-dir", "D1", "--save-final", "F1",
        restarts=1, cwd=tmp_path, timeout=150, script=GPT,
    )
    assert "rank 1: crashing (SIGKILL) before step 10" in crashed
    assert "resumed from step 8 (restart attempt 1)" in crashed, crashed[-4000:]
    torchrun(*args, "--checkpoint-dir", "D2", "--save-final", "F2", cwd=tmp_path, timeout=80, script=GPT)
    finals = []
    for name in ("F1", "F2"):
        flat = tmp_path / f"{name}.pt"
        dcp_to_torch_save(tmp_path / f"{name}.dcp" / "model_and_optimizer", flat)
        finals.append(torch.load(flat, weights_only=True))
        assert torch.load(tmp_path / f"{name}.dcp" / "state.pt", weights_only=True)["step"] == 12
    f1, f2 = finals
    assert f1["model"] and f1["optimizer"]["state"], "nothing saved"
    assert_identical(f1, f2)


@pytest.mark.timeout(200)
def test_fsdp_on_two_nodes_of_one_rank_trains_as_one_node_of_two(tmp_path):
    from tests.test_example import torchrun_nodes

    args = [*TINY, "--fsdp", "--steps", "4"]
    torchrun(*args, "--save-final", "one", cwd=tmp_path, timeout=80, script=GPT)
    launches = torchrun_nodes(*args, "--save-final", "two", cwd=tmp_path, script=GPT)
    for status, out in launches:
        assert status == 0, out[-6000:]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    finals = []
    for name in ("one", "two"):
        dcp_to_torch_save(tmp_path / f"{name}.dcp" / "model_and_optimizer", tmp_path / f"{name}.pt")
        finals.append(torch.load(tmp_path / f"{name}.pt", weights_only=True))
    assert_identical(*finals)


def test_both_mode_refuses_checkpoint_flags(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(GPT), "--mode", "both", "--save-final", "x.pt"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--checkpoint-dir, --save-final and --crash-at-step apply to --mode overlap or post" in proc.stderr
