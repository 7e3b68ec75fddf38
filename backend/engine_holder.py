"""The engine of this process: loaded once, in the background, so /health and /setup answer at once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import EngineNotReady

logger = logging.getLogger(__name__)


def import_model_code() -> None:
    """Import every module the engine loads lazily (segment_anything, groundingdino, MobileSAM)."""
    import importlib

    from . import engine, models  # noqa: F401 - imported for their side effect on sys.modules

    for name in ("segment_anything", "segment_anything.build_sam", "groundingdino.models",
                 "groundingdino.util.slconfig", "groundingdino.util.misc", "groundingdino.datasets.transforms",
                 "groundingdino.models.GroundingDINO.bertwarper",
                 "groundingdino.models.GroundingDINO.backbone.swin_transformer", "mobile_sam.build_sam",
                 # /setup parses the schema with it: a first import (~1 s, more on a busy machine) must
                 # not eat Label Studio's 3 s /setup timeout.
                 "label_studio_sdk.label_interface", "label_studio_sdk.converter.brush"):
        try:
            importlib.import_module(name)
        except ImportError:  # MobileSAM is optional; a missing package is reported by the loader
            pass


class EngineHolder:
    """Loads the engine once per process, in a background thread, so /health and /setup answer
    at once while the weights load. A failed load (weights missing) is retried after RETRY_S, so
    downloading the weights doesn't need a restart."""

    RETRY_S = 30.0

    def __init__(self, engine: Any | None = None, config_loader: Callable[[], Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._engine = engine
        self._config = engine.config if engine is not None else None
        self._model_version: str | None = engine.model_version if engine is not None else None
        self._error: str | None = None
        self._problems: list[str] = []
        self._failed_at = 0.0
        self._loading = False
        self._config_loader = config_loader
        if engine is not None:
            self._loaded.set()

    def start(self) -> None:
        """Begin loading in the background (no-op when loaded or already loading)."""
        with self._lock:
            if self._engine is not None or self._loading:
                return
            self._loading, self._error = True, None
            self._loaded.clear()
        # Import the model code here, not in the loader thread: two threads importing
        # segment_anything / groundingdino at once can hit Python's import-lock deadlock
        # (_DeadlockError), e.g. the loader against a request thread or the Flask app's own imports.
        import_model_code()
        threading.Thread(target=self._load, name="engine-loader", daemon=True).start()

    def _load(self) -> None:
        from .config import EngineConfig
        from .engine import Engine, model_version

        engine, error, config, version = None, None, None, None
        problems: list[str] = []
        try:
            config = (self._config_loader or EngineConfig.from_env)()
            version = model_version(config)
            problems, error = _weights_problems(config)
            if not problems:
                started = time.time()
                engine = Engine(config)
                version = engine.model_version  # names the runtime that serves (OpenVINO may fall back)
                logger.info("models loaded in %.1f s: %s", time.time() - started, engine.describe())
        except Exception as exc:  # missing weights, bad config, broken checkpoint: report, keep serving
            logger.exception("loading the models failed")
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._engine, self._loading = engine, False
            self._problems = problems if engine is None else []
            self._config = config or self._config
            self._model_version = version or self._model_version
            self._error = error
            self._failed_at = time.time() if error else 0.0
            self._loaded.set()
        if error:
            logger.error("models not ready: %s", error)

    def _maybe_retry(self) -> None:
        with self._lock:
            retry = self._error is not None and not self._loading and time.time() - self._failed_at > self.RETRY_S
        if retry:
            self.start()

    def status(self) -> tuple[str, str | None]:
        """("UP", None), ("loading", None) or ("not ready", reason)."""
        self._maybe_retry()
        with self._lock:
            if self._engine is not None:
                return "UP", None
            if self._error is not None:
                return "not ready", self._error
            return "loading", None

    def get(self, timeout: float | None = None) -> Any:
        """The engine, waiting up to ``timeout`` s for a load in progress; raises ``EngineNotReady``."""
        self._maybe_retry()
        if self._engine is None and not self._loading and self._error is None:
            self.start()
        self._loaded.wait(timeout)
        with self._lock:
            if self._engine is not None:
                return self._engine
            if self._error is not None:
                raise EngineNotReady(self._error)
        raise EngineNotReady("the models are still loading; try again in a moment")

    @property
    def engine(self) -> Any | None:
        return self._engine

    @property
    def problems(self) -> list[str]:
        """backend.weights' list of missing/corrupt files when the load failed for want of them."""
        with self._lock:
            return list(self._problems)

    @property
    def config(self) -> Any | None:
        return self._config

    @property
    def model_version(self) -> str | None:
        """Known as soon as the config is read (before the models load), so /setup never waits: until
        then it names the runtime RUNTIME resolves to here, afterwards the one that serves."""
        if self._model_version is None and self._config is None:
            self._read_config_only()
        return self._model_version

    def _read_config_only(self) -> None:
        from .config import EngineConfig
        from .engine import model_version

        try:
            config = (self._config_loader or EngineConfig.from_env)()
            version = model_version(config)
        except Exception as exc:
            logger.error("can't read the engine config: %s", exc)
            return
        with self._lock:
            self._config = self._config or config
            self._model_version = self._model_version or version


def _weights_problems(config: Any) -> tuple[list[str], str | None]:
    """backend.weights' problem list for ``config`` and its full message (with the download command)."""
    from .weights import check_ready, ensure_ready

    problems = list(check_ready(config))
    if not problems:
        return [], None
    try:
        ensure_ready(config)
    except Exception as exc:
        return problems, str(exc)
    return problems, "model weights are not ready: " + "; ".join(problems)
