"""Inference backends (model.backends): ONNX export with the real-valued frequency blocks, ONNX Runtime
runs that agree with eager, the export cache, and the choice a Predictor is given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import backends
from model.checkpoint import save_model
from model.predictor import Predictor
from model.registry import build_model

pytest.importorskip("onnxruntime")

SIZE = 64
CLASSES = {"segment": ["background", "crack"], "detect": ["a", "b"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for task, classes in CLASSES.items():
        torch.manual_seed(0)
        model = build_model(task, "tiny", len(classes)).eval()
        verdict = {"type": "any_defect", "min_score": 0.5, "min_area": 0}
        out[task] = save_model(model, root / task, {"name": f"t-{task}", "version": "1", "classes": classes,
                                                    "arch": {"input_size": [SIZE, SIZE]}, "verdict": verdict})
    return out


@pytest.fixture(scope="module")
def exported_detector(folders, tmp_path_factory):
    """(a Predictor of the tiny detector switched to onnxruntime by a first start, its report, the cache): the
    detector's graph also decodes boxes; the suite's classifier graph is `exported_classifier`'s."""
    cache = tmp_path_factory.mktemp("cache")
    p = Predictor.from_folder(folders["detect"])
    return p, backends.choose_backend(p, "onnxruntime", cache_dir=cache, threads=1), cache


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]


def test_a_first_start_exports_into_the_cache_and_the_next_start_loads_it(exported_detector, folders):
    p, report, cache = exported_detector
    assert report.chosen == "onnxruntime" and p.backend == "onnxruntime" and not report.cached
    assert report.export_s is not None and "agree" in report.reason
    (path,) = cache.glob(f"{p.manifest['sha256'][:16]}-onnx-64x64-*.onnx")
    assert p.runner.path == path == backends.cache_path(p, "onnxruntime", cache)
    # the export left the eager module intact: no placeholder tensors of the trace in its caches
    p.runner = None
    raw = p.infer([p.preprocess(_images(1)[0])])[0]
    assert all(type(v) is torch.Tensor for v in raw.values())
    again = Predictor.from_folder(folders["detect"])
    report = backends.choose_backend(again, "onnxruntime", cache_dir=cache, threads=1)
    assert report.cached and report.export_s is None and again.backend == "onnxruntime"
    assert list(cache.glob("*.onnx")) == [path]


@pytest.fixture(params=["classify", "detect"])
def exported(request) -> tuple[Path, Path]:
    """(weights folder, export cache holding its ONNX graph) of the suite's classifier and of the detector."""
    if request.param == "classify":
        return request.getfixturevalue("exported_classifier")
    _, _, cache = request.getfixturevalue("exported_detector")
    return request.getfixturevalue("folders")["detect"], cache


def test_the_cache_key_follows_the_network_code_only(monkeypatch):
    """Every module of every task's network (and the export wrapper) is defined in a hashed source, so a
    change to it makes a new key; preprocessing, training and evaluation code are not hashed, so editing
    them keeps the cached packages (minutes of compiling per model)."""
    import inspect

    sources = {p.resolve() for p in backends.graph_sources()}
    for task in ("classify", "detect", "segment"):
        for module in build_model(task, "tiny").modules():
            if type(module).__module__.startswith("model."):
                assert Path(inspect.getsourcefile(type(module))).resolve() in sources, type(module)
    root = Path(backends.__file__).resolve().parent
    assert {root / "backends.py", root / "blocks.py", root / "boxes.py", root / "heads" / "detect.py"} <= sources
    assert not {root / "transforms.py", root / "train.py", root / "data" / "augment.py"} & sources
    # the key moves with the hashed sources, not with the others
    key = backends.cache_key("ab" * 32, (64, 64), "onnx")
    monkeypatch.setattr(backends, "graph_sources", lambda: [*sources - {root / "blocks.py"}])
    assert backends.cache_key("ab" * 32, (64, 64), "onnx") != key


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_exported_graph_answers_as_eager_does(backend, exported):
    if backend == "openvino":
        pytest.importorskip("openvino")
    folder, cache = exported
    p = Predictor.from_folder(folder)
    imgs = _images()
    before = p.predict(imgs, conf=0.01)
    report = backends.choose_backend(p, backend, cache_dir=cache, threads=1)
    assert report.chosen == backend and p.backend == backend and "agree" in report.reason, report.reason
    assert report.cached  # the graph exported once serves both runtimes
    after = p.predict(imgs, conf=0.01)
    for a, b in zip(before, after, strict=True):
        assert a["verdict"] == b["verdict"] and [d["label"] for d in a["defects"]] == [d["label"] for d in b["defects"]]
        assert [d["score"] for d in a["defects"]] == pytest.approx([d["score"] for d in b["defects"]], abs=1e-4)
        if p.task == "classify":
            assert [t["score"] for t in a["top_k"]] == pytest.approx([t["score"] for t in b["top_k"]], abs=1e-4)
    if backend == "openvino":
        assert (cache / "openvino").is_dir()  # compiled blobs kept for the next start


def test_compile_runs_the_package_built_for_this_cpu_and_agrees_with_eager(compiled_classifier):
    folder, cache = compiled_classifier
    p = Predictor.from_folder(folder)
    imgs = _images(5)
    before = p.predict(imgs)
    report = backends.choose_backend(p, "compile", cache_dir=cache)
    assert report.chosen == "compile" and p.backend == "compile" and "agree" in report.reason, report.reason
    assert report.cached and report.export_s is None  # the package the fixture compiled: found, not rebuilt
    (package,) = cache.glob(f"{p.manifest['sha256'][:16]}-aoti-{backends.cpu_isa()}-t*-64x64-*.pt2")
    assert p.runner.path == package
    after = p.predict(imgs)
    for a, b in zip(before, after, strict=True):
        assert a["verdict"] == b["verdict"]
        assert [t["score"] for t in a["top_k"]] == pytest.approx([t["score"] for t in b["top_k"]], abs=1e-5)
    for n in (1, 3, 7):  # one package for every batch size: the batch dimension is dynamic
        x = torch.rand(n, 3, SIZE, SIZE)
        with torch.inference_mode():
            assert torch.allclose(p.runner(x)[0], p.model(x), atol=1e-4)
    # native code is for one instruction set: another CPU family gets its own package
    other = backends.cache_key(p.manifest["sha256"], p.input_size, "aoti-avx2")
    assert other != backends.cache_key(p.manifest["sha256"], p.input_size, "aoti-avx512")


def test_a_compiled_package_never_runs_on_more_threads_than_it_was_compiled_for(compiled_classifier):
    """Compiled parallel reductions keep one partial sum per thread in arrays sized when compiling: run on more
    threads, the process would crash. The cache keeps a package per thread count, one compiled for more threads
    serves fewer, and a forward asked on more runs on as many as its package was compiled for. Two forwards may
    run at once, each on its own thread's threads (the service's streams)."""
    import re
    import threading

    folder, cache = compiled_classifier
    p = Predictor.from_folder(folder)
    (package,) = cache.glob(f"{p.manifest['sha256'][:16]}-aoti-{backends.cpu_isa()}-t*-64x64-*.pt2")
    compiled_for = int(re.search(r"-t(\d+)-", package.name).group(1))  # by `s2amnet export`, on every core
    assert package == backends.cache_path(p, "compile", cache, threads=compiled_for)
    assert backends.cache_path(p, "compile", cache, threads=compiled_for + 1) != package
    runner, spent, cached = backends.load_runner(p, "compile", cache_dir=cache, threads=1)
    assert cached and spent is None and runner.path == package and runner.threads == compiled_for
    assert runner.concurrency == 1  # the service's default: one forward at a time
    runner = backends.CompiledRunner(package, input_size=p.input_size, threads=compiled_for, concurrency=2)
    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.inference_mode():
        ref = p.model(x)
    out: dict[str, tuple[torch.Tensor, int]] = {}
    inside: list[int] = []  # the threads each native forward ran on
    native = runner.fn
    runner.fn = lambda t: inside.append(torch.get_num_threads()) or native(t)

    def forward_on(threads: int, key: str, start: threading.Barrier | None = None) -> None:
        torch.set_num_threads(threads)  # this thread's own count
        if start is not None:
            start.wait(10)
        got = runner(x)[0]
        out[key] = (got, torch.get_num_threads())

    def on_threads(*calls) -> None:
        threads = [threading.Thread(target=forward_on, args=c) for c in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    on_threads((compiled_for * 4, "more"))
    on_threads((1, "fewer"))
    assert inside == [compiled_for, 1]
    start = threading.Barrier(2)
    on_threads((1, "side by side 1", start), (1, "side by side 2", start))
    assert set(out) == {"more", "fewer", "side by side 1", "side by side 2"}
    assert out["more"][1] == compiled_for * 4  # the thread's count is put back after the forward
    for key, (got, _) in out.items():
        assert torch.allclose(got, ref, atol=1e-4), key


def _longest_gap_while(run) -> tuple[float, float]:
    """(the longest gap between two turns of a Python loop on this thread, the duration of ``run()`` on another
    thread), both in seconds: a forward that holds the GIL stops this loop for as long as it runs."""
    import threading
    import time

    done = threading.Event()
    span: list[float] = []

    def forward() -> None:
        t0 = time.perf_counter()
        run()
        span.append(time.perf_counter() - t0)
        done.set()

    thread = threading.Thread(target=forward)
    gap, last = 0.0, time.perf_counter()
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    thread.join()
    return gap, span[0]


def test_a_compiled_forward_lets_go_of_the_gil_and_refuses_a_wrong_shape(compiled_classifier):
    """The service's event loop, decoding and postprocessing go on during a compiled forward (through torch's
    own loader they would stop for all of it); an input of the wrong size raises instead of crashing."""
    folder, cache = compiled_classifier
    p = Predictor.from_folder(folder)
    runner, _, cached = backends.load_runner(p, "compile", cache_dir=cache)
    assert cached and runner.releases_gil
    x = torch.rand(backends.MAX_EXPORT_BATCH, 3, SIZE, SIZE)
    runner(x)  # warm
    gap, span = _longest_gap_while(lambda: runner(x))
    assert span > 0.02 and gap < span / 3, (gap, span)
    with torch.inference_mode():
        assert torch.allclose(runner(x[:5])[0], p.model(x[:5]), atol=1e-4)
    held = torch._inductor.aoti_load_package(str(runner.path))  # the check above can fail: torch's loader
    gap, span = _longest_gap_while(lambda: held(x))
    assert gap > span / 2, (gap, span)
    for bad in (torch.rand(2, 3, SIZE + 8, SIZE), torch.rand(3, SIZE, SIZE),
                torch.rand(backends.MAX_EXPORT_BATCH + 1, 3, SIZE, SIZE)):
        with pytest.raises(ValueError, match="the compiled model takes"):
            runner(bad)


def test_openvino_bf16_runs_only_where_the_cpu_has_bf16_units_and_only_when_it_agrees(exported_classifier):
    ov = pytest.importorskip("openvino")
    folder, cache = exported_classifier
    p = Predictor.from_folder(folder)
    report = backends.choose_backend(p, "openvino-bf16", cache_dir=cache, threads=1)
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert report.chosen == "eager" and "no bf16 matrix units" in report.reason
        return
    if report.chosen == "eager":  # bfloat16 moved the probabilities by more than the parity bound
        assert "openvino-bf16 disagrees with eager: class probabilities differ" in report.reason
        return
    assert p.backend == "openvino-bf16" and "agree" in report.reason
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        assert torch.allclose(p.runner(x)[0].softmax(1), p.model(x).softmax(1), atol=1e-3)


def test_auto_times_every_backend_and_eager_stays_when_asked_or_when_the_runtime_fails(compiled_classifier,
                                                                                     tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    folder, cache = compiled_classifier
    p = Predictor.from_folder(folder)
    for batch in (2, None):  # a fixed forward batch; else each backend at its own best one
        report = backends.choose_backend(p, "auto", cache_dir=cache, threads=1, batch=batch, max_batch=4)
        usable = {b for b in backends.RUNNER_BACKENDS if not any(n.startswith(b + " ") for n in report.notes)}
        assert set(report.ms_per_image) == {"eager", *usable} and {"compile", "onnxruntime", "openvino"} <= usable
        fastest = min(report.ms_per_image, key=report.ms_per_image.get)
        assert report.chosen == fastest and p.backend == fastest and "fastest" in report.reason
        assert ("at 2 images per forward" if batch else "each at its best forward batch") in report.reason
        assert p.forward_batch is None  # choosing measures; setting the forward batch is the caller's
        if batch:
            assert report.forward_batch_ms == {}
        else:  # what the tuning measured, kept for the caller that sets the forward batch
            assert set(report.forward_batch_ms) == set(report.ms_per_image)
            for name, ms in report.ms_per_image.items():  # the chosen size's time among those measured
                assert ms in report.forward_batch_ms[name].values()
    assert backends.choose_backend(p, "eager").chosen == "eager" and p.runner is None

    def broken(*a, **k):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(backends, "export_onnx", broken)
    report = backends.choose_backend(p, "onnxruntime", cache_dir=tmp_path / "empty")
    assert report.chosen == "eager" and p.runner is None and "no exporter here" in report.reason
    with pytest.raises(ValueError, match="backend"):
        backends.choose_backend(p, "tensorrt")


def test_an_export_that_fails_leaves_nothing_half_made(folders, tmp_path, monkeypatch):
    p = Predictor.from_folder(folders["segment"])

    def fails_half_way(model, args, f, **kw):
        Path(f).write_bytes(b"half a graph")
        Path(f + ".data").write_bytes(b"half its weights")
        raise RuntimeError("the exporter gave up")

    monkeypatch.setattr(torch.onnx, "export", fails_half_way)
    with pytest.raises(RuntimeError, match="gave up"):
        backends.export_onnx(p.model, p.input_size, tmp_path / "out" / "model.onnx")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_runner_that_disagrees_is_refused(folders, tmp_path):
    p = Predictor.from_folder(folders["segment"])

    class Wrong:
        name = "wrong"

        def __call__(self, x):
            return (torch.zeros(x.shape[0], 2, SIZE, SIZE).index_fill_(1, torch.tensor([1]), 1.0),)

    ok, why = backends.check_parity(p, Wrong())
    assert not ok and "agree on" in why and p.runner is None
    p2 = Predictor.from_folder(folders["segment"], tta=["hflip"])
    assert backends.choose_backend(p2, "auto", cache_dir=tmp_path).reason.startswith("test-time augmentation")


def test_eager_bf16_runs_the_module_under_autocast_on_a_cpu_with_bf16_units(folders):
    p = Predictor.from_folder(folders["detect"])
    if not backends.cpu_has_bf16_units():  # refused, and the model stays on eager with the reason
        with pytest.raises(ValueError, match="bf16 matrix units"):
            backends.ModuleRunner(p.model, "cpu", bf16=True)
        report = backends.choose_backend(p, "eager-bf16")
        assert report.chosen == "eager" and p.runner is None and "bf16 matrix units" in report.reason
        return
    runner, spent, cached = backends.load_runner(p, "eager-bf16")
    assert runner.name == "eager-bf16" and spent is None and cached  # nothing exported or compiled
    x = torch.rand(2, 3, SIZE, SIZE)
    boxes, scores = runner(x)  # what the exported graph returns: decoded boxes and class scores
    with torch.inference_mode():
        ref_boxes, ref_scores = p.model.decode(p.model(x))
    assert boxes.shape == ref_boxes.shape and scores.shape == ref_scores.shape
    assert scores.dtype == torch.bfloat16 or not torch.equal(scores, ref_scores)  # computed in bf16, not fp32
    assert torch.allclose(scores.float(), ref_scores, atol=0.05)
    arrays = [np.random.default_rng(i).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8) for i in range(2)]
    p.runner = runner  # served through the Predictor as any runner
    out = p.infer(arrays)
    assert [set(o) for o in out] == [{"boxes", "scores"}] * 2 and out[0]["scores"].dtype == torch.float32


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_eager_channels_last_runs_a_copy_of_the_module_in_nhwc_and_agrees_with_eager(folders, task):
    p = Predictor.from_folder(folders[task])
    report = backends.choose_backend(p, "eager-channels-last")
    assert report.chosen == "eager-channels-last" and p.runner.name == "eager-channels-last", report.reason
    conv = next(m for m in p.runner.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.shape[1] > 1
    plain = next(m for m in p.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert not plain.weight.is_contiguous(memory_format=torch.channels_last)  # eager's own weights untouched
    x = torch.rand(3, 3, SIZE, SIZE)
    outs = p.runner(x)
    with torch.inference_mode():
        y = p.model(x)
        ref = p.model.decode(y) if task == "detect" else (y,)
    for o, r in zip(outs, ref, strict=True):  # the same arithmetic, and handed back in the usual order
        assert o.is_contiguous() and o.dtype == torch.float32 and torch.allclose(o, r, atol=1e-4, rtol=1e-4)
    arrays = [np.random.default_rng(i).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8) for i in range(3)]
    served = p.infer(arrays)
    p.runner = None
    for a, b in zip(served, p.infer(arrays), strict=True):
        assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4) for k in a)


def test_compile_bf16_runs_the_package_compiled_under_autocast_on_a_cpu_with_bf16_units(compiled_classifier,
                                                                                          tmp_path):
    folder, cache = compiled_classifier
    p = Predictor.from_folder(folder)
    if not backends.cpu_has_bf16_units():  # refused before any compiling, and the model stays on eager
        report = backends.choose_backend(p, "compile-bf16", cache_dir=tmp_path)
        assert report.chosen == "eager" and "bf16 matrix units" in report.reason and not list(tmp_path.iterdir())
        return
    runner, spent, cached = backends.load_runner(p, "compile-bf16", cache_dir=cache)
    assert runner.name == "compile-bf16" and cached and spent is None  # built in the background, found here
    (package,) = cache.glob(f"{p.manifest['sha256'][:16]}-aoti-bf16-{backends.cpu_isa()}-t*-64x64-*.pt2")
    assert runner.path == package and package != backends.cache_path(p, "compile", cache)
    x = torch.rand(3, 3, SIZE, SIZE)
    (got,) = runner(x)
    with torch.inference_mode():
        ref = p.model(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert not torch.allclose(got, ref, atol=1e-5)  # computed in bf16, not fp32
    assert torch.allclose(got.softmax(1), ref.softmax(1), atol=0.02)
