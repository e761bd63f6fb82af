"""The Model Registry: ``--register NAME`` makes a sweep's best model a new version of NAME.

The version is tagged with the sweep's parent run, its dataset fingerprint and val_acc. The
alias ``champion`` moves to it only when it beats the current champion's val_acc on the
same dataset fingerprint, or when NAME has no champion yet; val_accs measured on different
data are not compared, so a champion of other data stays where it is.
"""

from __future__ import annotations

import re
import urllib.parse

from sweeps.errors import UsageError
from sweeps.plan.uris import redact
from sweeps.records.format import ARTIFACT_PATH, TAG_FINGERPRINT, TAG_PARENT, TAG_VAL_ACC, TAG_VERSION_SWEEP  # noqa: F401

CHAMPION = "champion"
# Stores whose registry lives in the same database as the runs.
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))")


def check_registry(tracking_uri: str, name: str) -> None:
    """``--register NAME`` needs a tracking store with a Model Registry; fail before the sweep
    starts, naming the store, when it has none (MLflow 3's ``file:`` store refuses it)."""
    if not name.strip() or "/" in name or "@" in name or ":" in name:
        raise UsageError(f"--register {name!r}: a model name without '/', '@' or ':'")
    scheme = urllib.parse.urlsplit(tracking_uri).scheme.split("+")[0]
    if scheme in SQL_SCHEMES:  # the registry's tables are created with the tracking store's
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri, registry_uri=tracking_uri).search_registered_models(max_results=1)
    except MlflowException as e:
        first = str(e.message).strip().splitlines()[0][:300]
        raise UsageError(f"--register {name}: the tracking store {redact(tracking_uri)} has no usable Model "
                         f"Registry ({first}); log to a database store (e.g. --tracking-uri sqlite:///mlflow.db) "
                         "or an mlflow server") from None


def register(tracking_uri: str, name: str, parent_run_id: str, fingerprint: str, val_acc: float,
             sweep: str, log=print) -> dict | None:
    """Register ``runs:/<parent>/model`` as a new version of ``name``; move ``champion`` to it
    when it beats the champion on the same data. Says what it did through ``log`` and returns
    ``{"name", "version", "champion", "alias_moved", "reason"}``, or None when the run has no
    MLflow Model to register."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if "MLmodel" not in {f.path.rpartition("/")[2] for f in client.list_artifacts(parent_run_id, ARTIFACT_PATH)}:
        log(f"Not registered as {name}: run {parent_run_id} has no {ARTIFACT_PATH}/ (its MLflow Model)")
        return None
    try:
        client.create_registered_model(name, description="Best models of ftsweep sweeps")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {TAG_PARENT: parent_run_id, TAG_FINGERPRINT: fingerprint, TAG_VAL_ACC: repr(float(val_acc)),
            TAG_VERSION_SWEEP: sweep}
    version = client.create_model_version(name, f"runs:/{parent_run_id}/{ARTIFACT_PATH}", run_id=parent_run_id,
                                          tags=tags).version
    log(f"Registered the best model as {name} version {version} (models:/{name}/{version})")
    champion = current_champion(client, name)
    moved, reason = champion_decision(champion, fingerprint, float(val_acc))
    if moved:
        client.set_registered_model_alias(name, CHAMPION, version)
    if champion is None:
        log(f"{CHAMPION} -> {name} version {version}: {reason}")
    elif moved:
        log(f"{CHAMPION} moved from {name} version {champion.version} to version {version}: {reason}")
    else:
        log(f"{CHAMPION} stays {name} version {champion.version}: {reason}")
    return {"name": name, "version": int(version), "champion": int(version if moved else champion.version),
            "alias_moved": moved, "reason": reason}


def current_champion(client, name: str):
    """The model version the alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def champion_decision(champion, fingerprint: str, val_acc: float) -> tuple[bool, str]:
    """Whether the alias moves to a new version of ``val_acc`` on data ``fingerprint``, and why."""
    if champion is None:
        return True, "the model had no champion"
    was = champion.tags.get(TAG_FINGERPRINT)
    if was != fingerprint:
        return False, (f"it was trained on other data (dataset fingerprint {was}, this sweep's {fingerprint}); "
                       "val_accs of different data are not compared")
    try:
        best = float(champion.tags[TAG_VAL_ACC])
    except (KeyError, ValueError):
        return True, f"the champion has no val_acc tag; this sweep's is {val_acc:.4f}"
    if val_acc > best:
        return True, f"val_acc {val_acc:.4f} beats {best:.4f} on the same data"
    return False, f"val_acc {val_acc:.4f} does not beat its {best:.4f} on the same data"


def model_version(client, tracking_uri: str, uri: str):
    """The registered model version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI
    names; a UsageError naming the URI when there is none."""
    from mlflow.exceptions import MlflowException

    m = MODEL_URI.fullmatch(uri)
    if not m:
        raise UsageError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = m["name"], m["alias"], m["version"]
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":
            found = client.search_model_versions(f"name = '{name}'", max_results=1,
                                                 order_by=["version_number DESC"])
            if found:
                return found[0]
            raise MlflowException(f"registered model {name} has no versions")
        return client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND", "INTERNAL_ERROR"):
            raise UsageError(f"{uri} does not exist in {redact(tracking_uri)}: "
                             f"{str(e.message).strip().splitlines()[0][:300]}") from None
        raise UsageError(f"MLflow at {redact(tracking_uri)}: {e.message}") from None


def register_sweep(plan, info: dict, pending: list, log=print) -> dict | None:
    """``--register``, once the sweep has ended: register its best model unless there is none,
    the sweep was interrupted, or the model's upload is still among the unsent writes. Says
    what happened; a registry that fails now is reported, the sweep's results stay."""
    from mlflow.exceptions import MlflowException

    name = plan.register
    why_not = ("no trial produced a result" if info.get("best") is None
               else "the sweep was interrupted; --resume finishes it" if info.get("interrupted")
               else "the model is not in MLflow yet (its upload is among the unsent writes)"
               if any(op == "artifacts" and kw.get("artifact_path") == ARTIFACT_PATH for op, _, kw in pending)
               else None)
    if why_not:
        log(f"Not registered as {name}: {why_not}")
        return None
    try:
        return register(plan.tracking_uri, name, info["parent_run_id"], plan.data.dataset.fingerprint,
                        info["best"]["val_acc"], plan.name, log=log)
    except MlflowException as e:
        log(f"WARNING: registering the best model as {name} failed: {e.message}")
        return None
