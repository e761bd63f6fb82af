"""Hostile input, the way an unlucky or careless user gives it (issue 16): every input is
handled correctly or refused with exit 2 and a message naming it, before Ray starts;
every fault ends with an honest exit status."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from sweeps.cli import build_parser
from sweeps.plan import UsageError, prepare
from sweeps.run import main
from trainables.data import DataError, DataHandle, decode_image, scan, to_rgb

from conftest import write_image_folder

SIZE = 16  # decode_image's output side in these tests


def decoded(path: Path) -> np.ndarray:
    out = decode_image(str(path), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    return out


# --- image files: modes, metadata, frames, names ---------------------------------------

def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")
    out = decoded(tmp_path / "deep.png")
    assert out[..., 0].min() < 10 and out[..., 0].max() > 245  # a gradient, not near-white
    assert abs(out.mean() - 127.5) < 10
    assert (np.diff(out[SIZE // 2, :, 0].astype(int)) >= 0).all()  # still rising left to right


def test_a_32_bit_integer_image_is_scaled_like_16_bits(tmp_path):
    Image.fromarray(np.full((20, 20), 32768, np.int32), "I").save(tmp_path / "i.tif")
    assert abs(int(decoded(tmp_path / "i.tif")[0, 0, 0]) - 128) <= 1


@pytest.mark.parametrize(("values", "expected"), [(0.5, 128), (200.0, 200), (np.nan, 0)])
def test_a_float_image_is_read_as_0_to_1_or_clipped_to_0_to_255(tmp_path, values, expected):
    Image.fromarray(np.full((20, 20), values, np.float32), "F").save(tmp_path / "f.tif")
    assert abs(int(decoded(tmp_path / "f.tif")[0, 0, 0]) - expected) <= 1


def upright_and_tagged(tmp_path: Path) -> tuple[Path, Path]:
    """The same photo twice: stored upright, and stored sideways with EXIF orientation 6
    ("rotate 90 degrees clockwise to show"), as a phone writes a portrait photo."""
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[:, 20:] = 255  # dark left half, bright right half
    upright = Image.fromarray(pixels)
    upright.save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    return tmp_path / "upright.jpg", tmp_path / "tagged.jpg"


def test_exif_orientation_is_applied(tmp_path):
    upright, tagged = upright_and_tagged(tmp_path)
    a, b = decoded(upright).astype(int), decoded(tagged).astype(int)
    assert np.abs(a - b).mean() < 8
    assert b[:, : SIZE // 3].mean() < 40 and b[:, -SIZE // 3:].mean() > 215


def test_a_palette_image_with_alpha_keeps_its_colours():
    """PA has no file format of its own (PIL makes it in memory); it goes through RGBA."""
    pa = Image.new("RGB", (30, 20), (0, 200, 0)).convert("P").convert("PA")
    r, g, b = to_rgb(pa).getpixel((5, 5))  # the web palette's nearest green
    assert r == b == 0 and g > 190


@pytest.mark.parametrize("mode", ["CMYK", "LA", "1", "I;16", "YCbCr"])
def test_other_modes_keep_their_colour(tmp_path, mode):
    """A saturated green in each mode comes out green (mode 1 and grey ones: bright)."""
    ext = "tif" if mode in ("CMYK", "YCbCr") else "png"
    if mode == "I;16":
        img = Image.fromarray(np.full((20, 30), 60000, np.uint16))
    else:
        img = Image.new("RGB", (30, 20), (0, 200, 0)).convert(mode if mode != "1" else "L").convert(mode)
    img.save(tmp_path / f"x.{ext}")
    r, g, b = decoded(tmp_path / f"x.{ext}")[SIZE // 2, SIZE // 2].tolist()
    if mode in ("LA", "1", "I;16"):  # grey: green's luminance, or white after 1-bit thresholding
        assert r == g == b and g > 100
    else:
        assert g > 150 and r < 60 and b < 60, (r, g, b)


def test_an_animated_gif_and_a_multi_page_tiff_give_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "a.tiff", save_all=True, append_images=frames[1:])
    for name in ("a.gif", "a.tiff"):
        r, _, b = decoded(tmp_path / name)[0, 0].tolist()
        assert r > 200 and b < 50, name


def test_png_bytes_named_jpg_decode(tmp_path):
    Image.new("RGB", (20, 20), (0, 0, 250)).save(tmp_path / "misnamed.jpg", format="PNG")
    assert decoded(tmp_path / "misnamed.jpg")[0, 0].tolist() == [0, 0, 250]


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG of a few bytes whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


BAD_FILES = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "cannot identify image file"),
    "notes.jpg": (lambda p: p.write_text("not a picture\n"), "cannot identify image file"),
    "bomb.png": (lambda p: png_claiming(p, 100_000, 100_000), "DecompressionBombError"),
    "cut.png": (lambda p: p.write_bytes((Image.new("RGB", (64, 64), 9).save(p) or p.read_bytes())[:80]),
                "unreadable image"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_image_file_stops_the_sweep_naming_it(tmp_path, name):
    """Exit 2 (a UsageError) at plan time with the file listed, Ray not started, nothing logged."""
    data = write_image_folder(tmp_path / "images")
    make, reason = BAD_FILES[name]
    make(data / "cat" / name)
    with pytest.raises(UsageError) as e:
        prepare(args("--data", str(data), "--weights", "none", "--image-size", "16",
                     "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "r")),
                log=lambda _: None)
    message = str(e.value)
    assert f"{data / 'cat' / name}: " in message and reason in message, message
    assert "--skip-bad-images" in message
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "r").exists()
    assert not ray.is_initialized()


def test_skip_bad_images_leaves_a_decompression_bomb_out(tmp_path):
    data = write_image_folder(tmp_path / "images")
    png_claiming(data / "dog" / "bomb.png", 100_000, 100_000)
    handle = DataHandle(scan(data, val_fraction=0.5), 12, str(tmp_path / "cache"))
    kept = handle.prepare(skip_bad=True, log=lambda _: None)
    assert len(kept.dataset) == 12 and "bomb.png" in kept.dataset.skipped[0]
    with pytest.raises(DataError, match="bomb.png"):
        DataHandle(scan(data, val_fraction=0.5), 12, str(tmp_path / "cache2")).prepare(skip_bad=False)


# --- helpers for the command line -------------------------------------------------------

def args(*argv: str):
    return build_parser().parse_args(["--space", "smoke", *argv])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(argv: list[str], capsys, *culprits: str) -> str:
    """``main(argv)`` exits 2 naming every culprit; no Ray, no MLflow store, no results."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    for c in culprits:
        assert c in err, err
    assert "Traceback" not in err
    assert not ray.is_initialized()
    assert not Path("mlflow.db").exists() and not Path("sweep_results").exists()
    return err


# --- numbers on the command line --------------------------------------------------------

BAD_FLAGS = [
    (["--time-budget", "-5"], "--time-budget must be > 0 seconds, got -5"),
    (["--time-budget", "0"], "--time-budget must be > 0 seconds, got 0"),
    (["--time-budget", "nan"], "--time-budget must be a finite number, got nan"),
    (["--set", "lr=nan"], "--set lr=nan: lr must be a finite number"),
    (["--set", "lr=inf"], "--set lr=inf: lr must be a finite number"),
    (["--set", "weight_decay=-inf"], "--set weight_decay=-inf: weight_decay must be a finite number"),
    (["--set", "batch_size=1e999"], "--set batch_size=1e999"),
    (["--set", "seed=inf"], "--set seed=inf"),
    (["--max-epochs", "0"], "--max-epochs must be >= 1, got 0"),
    (["--image-size", "0"], "--image-size must be >= 1, got 0"),
    (["--image-size", "-32"], "--image-size must be >= 1, got -32"),
    (["--val-fraction", "0"], "--val-fraction must be between 0 and 1 (exclusive), got 0.0"),
    (["--val-fraction", "1"], "--val-fraction must be between 0 and 1 (exclusive), got 1.0"),
    (["--val-fraction", "-0.2"], "--val-fraction must be between 0 and 1 (exclusive), got -0.2"),
    (["--split-seed", "-1"], "--split-seed must be between 0 and 2**32 - 1, got -1"),
    (["--seed", "-3"], "--seed must be between 0 and 2**32 - 1, got -3"),
    (["--max-concurrent", "0"], "--max-concurrent must be >= 1, got 0"),
    (["--cpus-per-trial", "nan"], "--cpus-per-trial must be a finite number, got nan"),
    (["--gpus-per-trial", "inf"], "--gpus-per-trial must be a finite number, got inf"),
    (["--max-acc-drop", "nan"], "--max-acc-drop must be a finite number, got nan"),
    (["--data", ""], "--data must be a non-empty value, got ''"),
    (["--model", " "], "--model must be a non-empty value, got ' '"),
    (["--experiment", ""], "--experiment must be a non-empty value, got ''"),
    (["--name", ""], "--name must be a non-empty value, got ''"),
    (["--weights", ""], "--weights must be a non-empty value, got ''"),
    (["--tracking-uri", "foo://bar"], "--tracking-uri foo://bar: MLflow has no tracking store for 'foo://'"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_number_no_sweep_can_use_is_refused_naming_the_flag(in_tmp, capsys, flags, message):
    refused(["--space", "smoke", *flags], capsys, message)


# --- space files ------------------------------------------------------------------------

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)) + \
    "description: *i\n"

SPACE_FILES = {
    "laughs.yaml": (LAUGHS, "more than 10000 values once its YAML aliases are expanded"),
    "loop.yaml": ("description: &x [*x]\n", "more than 10000 values"),
    "list.yaml": ("- lr\n- decay_power\n", "expected a mapping at the top level, got list"),
    "scalar.yaml": ("just words\n", "expected a mapping at the top level, got str"),
    "empty.yaml": ("", "expected a mapping at the top level, got NoneType"),
    "deep.yaml": ("[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "nan.yaml": ("fixed: {lr: .nan}\n", "fixed: lr must be a finite number, got nan"),
    "inf.yaml": ("search:\n  lr: {type: uniform, low: 0.1, high: .inf}\n", "lr must be a finite number"),
    "huge.yaml": ("fixed: {batch_size: 1e999}\n", "batch_size"),
}


@pytest.mark.parametrize("name", sorted(SPACE_FILES))
def test_a_space_file_no_sweep_can_use_is_refused_naming_it(in_tmp, capsys, name):
    text, message = SPACE_FILES[name]
    (in_tmp / name).write_text(text)
    refused(["--space", str(in_tmp / name)], capsys, str(in_tmp / name), message)


def test_a_billion_laughs_file_is_small_and_refused_without_expanding(in_tmp, capsys):
    import resource

    assert len(LAUGHS) < 1024
    (in_tmp / "laughs.yaml").write_text(LAUGHS)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(["--space", str(in_tmp / "laughs.yaml")], capsys, "laughs.yaml")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no gigabytes


def test_a_folder_or_a_binary_file_as_space_is_refused_naming_it(in_tmp, capsys):
    (in_tmp / "spaces.yaml").mkdir()
    refused(["--space", str(in_tmp / "spaces.yaml")], capsys, f"--space {in_tmp / 'spaces.yaml'}: a folder")
    (in_tmp / "blob.yaml").write_bytes(bytes(range(256)) * 4)
    refused(["--space", str(in_tmp / "blob.yaml")], capsys, f"{in_tmp / 'blob.yaml'}: not a text file")


def test_a_space_file_may_still_use_a_few_aliases(in_tmp):
    from search_spaces.loader import load_space

    (in_tmp / "ok.yaml").write_text("fixed: &f {max_epochs: 2}\nsearch:\n"
                                    "  lr: &r {type: uniform, low: 0.01, high: 0.1}\n")
    assert load_space(str(in_tmp / "ok.yaml")).fixed == {"max_epochs": 2}


# --- --storage --------------------------------------------------------------------------

def test_storage_that_is_a_file_is_refused(in_tmp, capsys):
    (in_tmp / "taken").write_text("x")
    refused(["--space", "smoke", "--storage", "taken"], capsys, "--storage taken", "is a file, not a folder")


def test_storage_under_a_file_cannot_be_created(in_tmp, capsys):
    (in_tmp / "taken").write_text("x")
    refused(["--space", "smoke", "--storage", "taken/results"], capsys, "--storage taken/results",
            f"cannot create it, {in_tmp / 'taken'} is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_storage_without_permission_is_refused(in_tmp, capsys):
    (in_tmp / "locked").mkdir(mode=0o500)
    refused(["--space", "smoke", "--storage", "locked/results"], capsys, "--storage locked/results",
            "not writable")


# --- signals ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("signame", "code", "said"), [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
def test_ctrl_c_or_sigterm_during_a_sweep_is_not_a_success(tmp_path, cache_dir, signame, code, said):
    """SIGINT (Ctrl-C) or SIGTERM mid-sweep: exit 128 + the signal, the parent run KILLED (not
    FINISHED) with how to go on in its stop_reason, the running trials counted as interrupted
    (not stopped early), the summary and the last words say it was interrupted and how to go on."""
    import contextlib
    import json
    import signal
    import subprocess
    import time

    from conftest import RUN, stop_group

    data = write_image_folder(tmp_path / "images")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        # one trial: with two, ASHA may stop the worse one at its first rung before the signal
        [*RUN, "--space", "smoke", "--trials", "1", "--max-epochs", "500", "--image-size", "16",
         "--weights", "none", "--data", str(data), "--name", "cut", "--tracking-uri", uri,
         "--storage", str(tmp_path / "results")],
        cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        results = tmp_path / "results" / "cut"
        while time.monotonic() < deadline and driver.poll() is None:
            if any(f.stat().st_size for f in results.glob("trial_*/result.json")):
                break  # a trial has reported an epoch
            time.sleep(0.5)
        assert driver.poll() is None, log.read_text()[-3000:]
        os.kill(driver.pid, getattr(signal, signame))
        rc = driver.wait(300)
    finally:
        stop_group(driver)
    out = log.read_text()
    assert rc == code, out[-3000:]
    assert f"INTERRUPTED ({said})" in out and "--resume --name cut" in out
    summary = json.loads((results / "sweep_summary.json").read_text())
    assert summary["interrupted"]["signal"] == signame and "--resume" in summary["interrupted"]["resume"]
    import sqlite3  # read the store directly: one test process's MLflow clients cache stores

    assert summary["trials"]["interrupted"] >= 1 and summary["trials"]["stopped_early"] == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        status = db.execute("select status from runs where run_uuid = ?", (summary["parent_run_id"],)).fetchall()
        reason = db.execute("select value from tags where run_uuid = ? and key = 'stop_reason'",
                            (summary["parent_run_id"],)).fetchall()
    assert status == [("KILLED",)]
    assert reason == [(f"interrupted by {signame}; to continue, run the same command with --resume --name cut",)]


# --- sizes and folder shapes ------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 60_000), (60_000, 1), (1, 1)])
def test_an_extreme_aspect_ratio_decodes_without_a_giant_intermediate(tmp_path, shape):
    """Resizing a 1 x 60000 strip's short side to 256 before cropping would need 11 GB."""
    import resource

    width, height = shape
    Image.new("L", (width, height), 77).save(tmp_path / "strip.png")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = decode_image(str(tmp_path / "strip.png"), 256)
    assert out.shape == (256, 256, 3) and (out == 77).all()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_a_symlink_loop_in_a_class_folder_does_not_hang_the_scan(tmp_path):
    data = write_image_folder(tmp_path / "images", per_class=3)
    (data / "cat" / "up").symlink_to("..")
    assert len(scan(data)) == 6


def test_a_file_named_as_the_data_folder_is_refused_naming_it(tmp_path):
    (tmp_path / "images").write_text("x")
    with pytest.raises(DataError, match=f"data folder not found: {tmp_path / 'images'}"):
        scan(tmp_path / "images")


# --- weights, credentials, two sweeps at once -------------------------------------------

def test_a_folder_as_weights_is_refused_as_a_folder(in_tmp, capsys):
    data = write_image_folder(in_tmp / "images")
    (in_tmp / "weights").mkdir()
    refused(["--space", "smoke", "--data", str(data), "--image-size", "16", "--weights", str(in_tmp / "weights")],
            capsys, str(in_tmp / "weights"), "is a folder; --weights takes a state_dict file")


@pytest.fixture
def basic_auth_server():
    """A loopback server that answers MLflow's /health and get-experiment-by-name only to
    the user ``alice`` with password ``s3cret`` (HTTP basic authentication); it records
    the Authorization header of every request."""
    import base64
    import http.server
    import json
    import threading

    seen: list[str | None] = []
    good = "Basic " + base64.b64encode(b"alice:s3cret").decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != good:
                self.send_response(401)
                self.end_headers()
                return
            body = b"OK" if self.path == "/health" else json.dumps(
                {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen, good
    server.shutdown()


def test_credentials_in_the_tracking_uri_are_sent_not_taken_for_an_unreachable_server(basic_auth_server):
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import check_tracking_uri

    port, seen, good = basic_auth_server
    check_tracking_uri(f"http://alice:s3cret@127.0.0.1:{port}", timeout=5)  # reachable: no error
    assert seen[-1] == good
    with pytest.raises(UsageError, match=r"http://\*\*\*@127\.0\.0\.1:\d+ refused the credentials \(HTTP 401\)"):
        check_tracking_uri(f"http://alice:wrong@127.0.0.1:{port}", timeout=5)
    # MLflow's own client sends them the same way
    assert MlflowClient(f"http://alice:s3cret@127.0.0.1:{port}").get_experiment_by_name("x") is None
    assert seen[-1] == good


def test_a_token_given_as_the_user_name_is_never_printed(in_tmp, capsys, basic_auth_server):
    port, _, _ = basic_auth_server
    token = "dapi5f3c0ffee5f3c0ffee5f3c0ffee"
    out = refused(["--space", "smoke", "--tracking-uri", f"http://{token}@127.0.0.1:{port}"], capsys,
                  f"http://***@127.0.0.1:{port}", "refused the credentials")
    assert token not in out


def test_the_mlflow_writer_never_sees_the_uri_on_its_command_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import tempfile

    from sweeps.writer import WriterProcess

    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    uri = f"sqlite:///{tmp_path}/secret-place.db"
    write = WriterProcess(uri, tmp_path / "pending.jsonl", {})
    try:
        cmdline = Path(f"/proc/{write._proc.pid}/cmdline").read_bytes().decode()
        assert "secret-place" not in cmdline
    finally:
        assert write.close() == []
    assert list(shared_tmp.iterdir()) == []


def test_a_remote_sweep_keeps_its_scratch_files_in_the_users_cache_not_in_a_shared_temp_folder(tmp_path, monkeypatch):
    from sweeps import storage

    monkeypatch.setenv("FTSWEEP_CACHE", str(tmp_path / "cache"))
    folder = storage.SweepFolder(f"file://{tmp_path}/bucket/s1")
    assert folder.local.is_relative_to(tmp_path / "cache")
    assert folder.local.stat().st_mode & 0o077 == 0  # the owner's alone
    (folder.local / "sweep_summary.json").write_text("{}")
    (tmp_path / "bucket" / "s1").mkdir(parents=True)  # as Ray Tune makes it
    folder.publish()
    assert (tmp_path / "bucket" / "s1" / "sweep_summary.json").exists() and not folder.local.exists()


def test_one_sweep_name_is_claimed_by_one_driver(tmp_path):
    from sweeps import storage

    first = storage.SweepFolder(str(tmp_path / "results" / "s"))
    with pytest.raises(storage.SweepTaken, match="exists already"):
        storage.SweepFolder(str(tmp_path / "results" / "s"))  # a new sweep of a taken name
    with pytest.raises(storage.SweepTaken, match="another process is running this sweep now"):
        storage.SweepFolder(str(tmp_path / "results" / "s"), resume=True)  # --resume while it runs
    first.close()  # the first driver ends
    storage.SweepFolder(str(tmp_path / "results" / "s"), resume=True)


def _open_store_at_once(uri: str, n: int) -> list[int]:
    import subprocess
    import sys

    code = "import sys; from sweeps.tracking import client; client(sys.argv[1]).get_experiment_by_name('x')"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stderr=subprocess.PIPE) for _ in range(n)]
    return [p.wait(120) for p in procs]


@pytest.mark.slow
def test_two_sweeps_opening_a_new_sqlite_store_at_the_same_moment_both_work(tmp_path):
    """MLflow creates a new sqlite store's schema on first use; two processes doing it at
    once crash one of them (alembic's "expected to match one row") without the lock."""
    for i in range(3):
        assert _open_store_at_once(f"sqlite:///{tmp_path}/m{i}.db", 2) == [0, 0]


@pytest.mark.slow
def test_two_sweeps_of_one_name_started_together_run_once(tmp_path, cache_dir):
    """Both pass the name check before either has a run; the folder claim lets one run and
    stops the other with exit 2 before it logs anything."""
    import subprocess

    from conftest import RUN

    data = write_image_folder(tmp_path / "images")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [*RUN, "--space", "smoke", "--trials", "1", "--max-epochs", "1", "--image-size", "16",
            "--weights", "none", "--data", str(data), "--name", "twin", "--tracking-uri", uri,
            "--storage", str(tmp_path / "results")]
    procs = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused_out = outs[[p.returncode for p in procs].index(2)]
    assert "--name twin" in refused_out and "Traceback" not in refused_out
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        parents = db.execute("select count(*) from tags where key = 'ftsweep.role' and value = 'parent'").fetchone()
    assert parents == (1,)


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_ctrl_c_or_a_failed_ray_start_while_the_checks_run_opens_no_sweep(in_tmp, monkeypatch, capsys, fault):
    """Ray starts while the slower checks run beside it; when its start is interrupted
    (Ctrl-C: exit 130) or fails, the checks end and no sweep is opened (no MLflow run, no
    claimed name)."""
    import time

    import sweeps.ray_session
    import sweeps.run

    opened = []

    def slow_checks(args, checked):
        checked()  # the quick checks passed: Ray starts now
        time.sleep(1)
        return "plan"

    def ray_start(address, **options):
        raise fault("Ray did not start")

    monkeypatch.setattr(sweeps.run, "prepare", slow_checks)
    monkeypatch.setattr(sweeps.ray_session, "init_ray", ray_start)
    monkeypatch.setattr(sweeps.run, "open_sweep", opened.append)
    if fault is KeyboardInterrupt:
        assert main(["--space", "smoke"]) == 130
        assert "INTERRUPTED (Ctrl-C) before the sweep started" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="Ray did not start"):
            main(["--space", "smoke"])
    assert opened == [] and not ray.is_initialized()
