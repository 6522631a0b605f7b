"""The code examples in README.md and docs/agent.md run as written.

The docs/agent.md example is complete and runs verbatim in a fresh directory. The README snippets
use the user's own names (model, optimizer, my_sampler, ...): they run after a small preamble that
defines those names, so the calls they show are the real API.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text())


def run_script(code: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    script = cwd / "example.py"
    script.write_text(code)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}  # emascope only as installed
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"example failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


PREAMBLE = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 2))
optimizer = opt = torch.optim.SGD(model.parameters(), lr=0.05)
real_data = torch.randn(300, 2)
data = [torch.randn(64, 2) for _ in range(40)]

def loss(model, batch):
    return ((model(batch) - batch) ** 2).mean()

def my_sampler(model, n, generator):
    return model(torch.randn(n, 2, generator=generator))

evaluated = []
def evaluate(model):
    evaluated.append(model[0].weight.detach().clone())
"""


def test_readme_bank_example_runs(tmp_path: Path):
    blocks = python_blocks(REPO / "README.md")
    bank_block = next(b for b in blocks if "EMABank(model)" in b)
    check = """
live = {k: v.clone() for k, v in model.state_dict().items()}
with bank.swap(model, 0.9995):
    pass
assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())
assert len(evaluated) == 1 and not torch.equal(evaluated[0], live["0.weight"])
from safetensors.torch import load_file
fresh = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 2))
fresh.load_state_dict(load_file("ema-0.9995.safetensors"))
ref = bank.materialize(0.9995)
assert all(torch.equal(ref[k], v) for k, v in fresh.state_dict().items())
assert bank.step == 40
print("ok")
"""
    proc = run_script(PREAMBLE + bank_block + check, tmp_path)
    assert proc.stdout.strip().endswith("ok")


def test_readme_quickstart_runs(tmp_path: Path):
    blocks = python_blocks(REPO / "README.md")
    quick = next(b for b in blocks if "attach(" in b)
    # the user's loop goes where the comment says it goes; score_every as written (5000) is longer
    # than this loop, so close() does the one sweep
    loop = "for batch in data:\n    loss(model, batch).backward(); opt.step(); opt.zero_grad()\n"
    code = PREAMBLE + quick.replace("# ... your training loop", loop + "# ... your training loop")
    run_script(code, tmp_path)
    run = tmp_path / "runs" / "exp1"
    info = json.loads((run / "run.json").read_text())
    assert info["decays"][0] == 0.5 and len(info["decays"]) == 10
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in lines} == {40}
    assert {r["variant"] for r in lines} == {"raw", *(repr(d) for d in info["decays"])}
    assert (run / "banks" / "latest.safetensors").stat().st_size > 0
    # the export command shown right after it
    cmd = next(line for line in (REPO / "README.md").read_text().splitlines()
               if line.startswith("emascope export runs/exp1"))
    out = subprocess.run([sys.executable, "-m", "emascope.cli", *cmd.split()[1:]], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "0.weight" in load_file(tmp_path / "ema.safetensors")


@pytest.mark.slow
def test_agent_md_example_runs_verbatim(tmp_path: Path):
    blocks = python_blocks(REPO / "docs" / "agent.md")
    example = blocks[0]
    assert "with attach(" in example
    proc = run_script(example, tmp_path, timeout=600)
    assert "best fd at step 1500" in proc.stdout
    run = tmp_path / "runs" / "quickstart"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in lines} == {500, 1000, 1500}
    assert any(r["metric"] == "val_loss" for r in lines)
    exported = list((run / "exports").glob("*.safetensors"))
    assert len(exported) == 1
    tensors = load_file(exported[0])
    assert set(tensors) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # "Reading a run from Python", verbatim, on the run the example wrote
    reading = next(b for b in blocks if b.startswith("from emascope.dashboard.data import"))
    out = run_script(reading, tmp_path, timeout=300).stdout
    assert "[0.9, 0.99, 0.995, 0.999, 0.9999] lower finished" in out
    assert "0 None" in out and "quickstart" in out and "0.9999" in out


def test_agent_md_documents_every_attach_argument_with_its_default():
    import inspect
    import re

    from emascope import attach

    text = (REPO / "docs" / "agent.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text, flags=re.M))
    for name, p in inspect.signature(attach).parameters.items():
        assert name in rows, f"docs/agent.md lacks a row for attach argument {name!r}"
        if p.default is inspect.Parameter.empty:
            assert rows[name].strip() == "required", name


def test_agent_md_defaults_are_attachs_defaults():
    """The `default` column of attach's table in docs/agent.md is the real default (literal or a named constant)."""
    import ast
    import inspect

    import emascope
    from emascope import attach

    text = (REPO / "docs" / "agent.md").read_text()
    table = text[text.index("| argument | default | meaning |"):]
    table = table[:table.index("\n\n")]  # attach's table only (others have a `feature_extractor` row too)
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, flags=re.M))
    for name, p in inspect.signature(attach).parameters.items():
        if p.default is inspect.Parameter.empty:
            continue
        shown = rows[name].strip().strip("`")
        value = getattr(emascope, shown) if shown.isidentifier() and shown.isupper() else ast.literal_eval(shown)
        assert value == p.default and type(value) is type(p.default), (name, shown, p.default)
