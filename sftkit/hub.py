"""Pushing trained folders to the ModelScope hub, and when to push for each --push_hub_strategy.

The strategy is pure logic (push_plan, push_path), so it is tested without a network; push_to_hub is the
only function here that talks to the hub.
"""
from __future__ import annotations

import os

STRATEGIES = ("end", "push_best", "push_last", "checkpoint", "all_checkpoints")
EVENTS = ("save", "end")
LAST_CHECKPOINT = "last-checkpoint"
TOKEN_ENV = "MODELSCOPE_API_TOKEN"


class HubError(RuntimeError):
    """A push that cannot happen or failed, with what to do about it."""


def push_plan(strategy: str, event: str, checkpoint: str | None, is_best: bool) -> bool:
    """Whether `checkpoint` goes to the hub now (ms-swift's meanings).

    event is "save" (a checkpoint was just written) or "end" (training finished; checkpoint is the
    folder to publish). end: only at the end. push_best: on saves that made a new best, and at the end.
    push_last, checkpoint, all_checkpoints: on every save and at the end.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"push_hub_strategy must be one of {', '.join(STRATEGIES)}, got '{strategy}'")
    if event not in EVENTS:
        raise ValueError(f"push event must be one of {', '.join(EVENTS)}, got '{event}'")
    if checkpoint is None:
        return False
    if event == "end":
        return True
    if strategy == "end":
        return False
    return is_best if strategy == "push_best" else True


def push_path(strategy: str, event: str, checkpoint: str) -> str:
    """Where in the repository the folder goes: the root (replacing what is there), 'last-checkpoint', or
    the checkpoint's own folder name for all_checkpoints. What the end publishes always goes to the root."""
    if event == "end" or strategy in ("end", "push_best", "push_last"):
        return ""
    if strategy == "checkpoint":
        return LAST_CHECKPOINT
    return os.path.basename(os.path.normpath(checkpoint))


def maybe_push(strategy: str, event: str, checkpoint: str | None, is_best: bool, upload) -> bool:
    """Call upload(folder, path_in_repo) when the strategy says so; whether it did."""
    if not push_plan(strategy, event, checkpoint, is_best):
        return False
    upload(checkpoint, push_path(strategy, event, checkpoint))
    return True


def push_to_hub(folder: str, hub_model_id: str, path_in_repo: str = "", *, token: str | None = None,
                private: bool = False, commit_message: str = "Upload from sftkit", api=None) -> None:
    """Upload `folder` into ModelScope repository `hub_model_id` (created if missing) under path_in_repo.

    The token comes from `token` or MODELSCOPE_API_TOKEN; `api` stands in for modelscope's HubApi in tests.
    """
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise HubError(f"pushing to ModelScope needs an access token: pass --hub_token or set {TOKEN_ENV} "
                       "(create one at https://modelscope.cn/my/myaccesstoken)")
    if not os.path.isdir(folder):
        raise HubError(f"nothing to push: {folder!r} is not a folder")
    api = api or _hub_api()
    try:
        api.login(token)
        api.create_repo(hub_model_id, token=token, visibility="private" if private else "public", exist_ok=True)
        api.upload_folder(repo_id=hub_model_id, folder_path=folder, path_in_repo=path_in_repo,
                          commit_message=commit_message, token=token)
    except Exception as error:  # network, auth and hub errors all need the same message
        raise HubError(f"could not push {folder!r} to ModelScope {hub_model_id!r}: {type(error).__name__}: {error}. "
                       "Offline, or a wrong token or repository name? The folder is intact; push it later with "
                       "sftkit.hub.push_to_hub") from error


def _hub_api():
    try:
        from modelscope.hub.api import HubApi
    except ImportError as error:
        raise HubError("pushing to ModelScope needs modelscope: pip install modelscope") from error
    return HubApi()
