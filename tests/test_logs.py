"""Library log lines go to a file beside the records, not between pkt-bench's own lines."""

import logging

from pkt_bench.runner import library_logs
from pkt_bench.stages import StageMeter


def test_library_logs_go_to_the_file_and_to_stderr_only_when_verbose(tmp_path, capfd):
    import transformers

    log = tmp_path / "logs" / "run.log"
    with library_logs(log, verbose=False):
        logging.getLogger("vllm.engine").info("engine started")
        transformers.logging.get_logger("transformers.modeling_utils").warning("weights tied")
    text = log.read_text()
    assert "INFO vllm.engine: engine started" in text and "weights tied" in text
    assert "engine started" not in capfd.readouterr().err
    with library_logs(tmp_path / "verbose.log", verbose=True):
        logging.getLogger("lm_eval").info("building contexts")
    assert "building contexts" in capfd.readouterr().err
    logging.getLogger("vllm").info("after the run")
    assert "after the run" not in log.read_text()  # the handlers are gone with the run


def test_the_stage_meter_says_which_stage_runs():
    heard = []
    meter = StageMeter(on_stage=heard.append)
    with meter.stage("transfer"):
        with meter.stage("fine-tune"):
            pass
    assert heard == ["transfer", "fine-tune", "transfer", None]
