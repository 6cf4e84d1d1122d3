"""The house: modules import each other one way only, and output written to a file reads like a report."""

import ast
import glob
import os
import subprocess

import pytest

import cli
import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train_mlm", "train_joint", "train_mrl", "train_baseline", "evaluate", "chat", "demo", "bench"}


def import_graph():
    """{module: project modules it imports anywhere in the file, function-level imports included}."""
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "data", "*.py"))
    mods = {os.path.relpath(f, ROOT)[:-3].replace(os.sep, "."): f for f in files}
    graph = {}
    for m, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(f).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def test_the_import_graph_has_no_cycle():
    graph, done = import_graph(), set()

    def visit(m, path):
        assert m not in path, f"import cycle: {' -> '.join(path + [m])}"
        if m not in done:
            for d in graph[m]:
                visit(d, path + [m])
            done.add(m)

    for m in graph:
        visit(m, [])


def test_model_engine_and_data_import_no_training_plumbing_or_script():
    graph = import_graph()
    for m, deps in graph.items():
        if m in ("model", "engine", "cli", "scores") or m.startswith("data."):
            assert not deps & (SCRIPTS | {"training"}), (m, deps)
    assert graph["model"] == set() and graph["cli"] == set()
    for stage in ("train_mlm", "train_joint", "train_mrl", "train_baseline"):
        assert "evaluate" not in graph[stage] and not graph[stage] & SCRIPTS, stage


def test_progress_in_a_log_file_is_a_line_every_tenth(capsys):
    for _ in cli.progress(range(1000), desc="steps"):
        pass
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("steps: 1000/1000")
    for total in (25, 7, 99):  # never more than ten lines, whatever the total, and always the last one
        for _ in cli.progress(range(total), desc="steps"):
            pass
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) <= 10 and lines[-1].startswith(f"steps: {total}/{total}"), total
    for _ in cli.progress(range(500, 1000), desc="steps", total=1000, initial=500):  # a resumed run
        pass
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["600/1000", "700/1000", "800/1000", "900/1000", "1000/1000"]


def test_the_demo_runs_its_final_phase_and_evaluates_that_checkpoint():
    for final in ("mrl", "dmpo"):
        cmds = dict(demo.stages([], False, final))
        assert f"--phases=smat,{final}" in cmds["memory stages"]
        assert f"--ckpt={demo.OUT}/{final}/ckpt.pt" in cmds["eval"]


def test_the_demo_stops_at_the_first_stage_that_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = []

    def run(cmd):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 1 if "config/nano_mlm.py" in cmd else 0)

    monkeypatch.setattr(demo.subprocess, "run", run)
    assert demo.main(["--no-chat"]) == 1
    assert len(ran) == 2 and "config/nano_mlm.py" in ran[-1]  # the world, then MLM failed: nothing after it


@pytest.mark.parametrize("code", [1, -9])  # -9: the stage was killed (out of memory, Ctrl-C's group kill)
def test_the_demo_stops_at_a_stage_that_failed_or_was_killed(tmp_path, monkeypatch, capsys, code):
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, code))
    assert demo.main(["--no-chat"]) == 1
    assert len(ran) == 1 and "failed" in capsys.readouterr().err  # nothing ran after the failed stage
