"""docs/choosing-hyperparameters.md shows exactly the code and the output of
docs/examples/choosing_hyperparameters.py, so its numbers cannot go stale."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "examples" / "choosing_hyperparameters.py"
PAGE = ROOT / "docs" / "choosing-hyperparameters.md"
BLOCK = re.compile(
    r"<!-- example: (\w+) -->\n```python\n(.*?)\n```\n\nOutput:\n\n```text\n(.*?)\n```\n"
    r"<!-- /example -->",
    re.S,
)


def test_page_matches_script_output():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--json"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        check=True,
        timeout=300,
    )
    rendered = json.loads(run.stdout)
    page = PAGE.read_text(encoding="utf-8")
    shown = {name: (code, output) for name, code, output in BLOCK.findall(page)}
    assert page.count("<!-- example:") == len(shown), "a malformed example block in the page"
    assert list(shown) == list(rendered), "the page and the script list different examples"
    stale = "run `python docs/examples/choosing_hyperparameters.py --write`"
    for name, item in rendered.items():
        code, output = shown[name]
        assert code == item["code"], f"code of example {name!r} differs: {stale}"
        assert output == item["output"], f"output of example {name!r} differs: {stale}"
    # spot checks against docs/reference/algorithms.md#initialisation-tests and #amos-tests item 3,
    # independent of the script
    assert "0.0175925" in shown["init_std"][1]
    assert "lr = 4.005e-05, weight_decay = 0.0154" in shown["sign_optimizer_lr"][1]
    assert "27.71" in shown["tied_embeddings"][1]
