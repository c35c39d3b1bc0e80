"""bench/bad_inputs.py on the session's tiny run: every bad input gets a clear error (issue 8)."""

import json

from conftest import run_script


def test_every_bad_input_gets_a_clear_error(tiny_run, cli_env, tmp_path):
    workdir, _ = tiny_run
    report = tmp_path / "bad_inputs.json"
    r = run_script(
        [
            "bench/bad_inputs.py",
            f"--workdir={workdir}",
            f"--cache_dir={cli_env['DSV3_CACHE']}",
            f"--json={report}",
        ],
        cli_env,
    )
    results = json.loads(report.read_text())["results"]
    assert len(results) >= 60, len(results)
    bad = [f"{x['verdict']}: {x['case']}: {x['last']}" for x in results if x["verdict"] != "clear"]
    assert not bad, "\n".join(bad) + "\n" + r.stdout[-2000:]
    assert r.returncode == 0
