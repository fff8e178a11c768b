"""The page: Train, Chat, Evaluate and Data tabs over the library. Gradio is imported here only.

Handlers are thin: a form becomes a config through forms.parse_form (as flags do), then the same library
function the CLI calls runs; training runs as a `sftkit train` child process (jobs.TrainJob). Mistakes
in what the user typed show as lines in the tab's status box, never as a traceback.
"""
from __future__ import annotations

import os
import threading
import time
import traceback

import gradio as gr

from ..config import (ChatConfig, ConfigError, EvalConfig, MergeConfig, PreviewConfig, TrainConfig, WebUIConfig,
                      build_config)
from ..data.formats import Message
from ..logs import loss_figure
from ..paths import bundled
from ..run import BEST, LATEST, pointer
from . import forms, jobs, views

FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # local fonts only: the page fetches nothing from elsewhere
CSS = """
.sftkit-bar { height: 12px; border-radius: 6px; background: var(--neutral-200); overflow: hidden; }
.sftkit-bar > div { height: 100%; background: var(--color-accent); transition: width 0.5s; }
#train-log textarea { font-family: ui-monospace, monospace; font-size: 12px; }
"""
POLL_SECONDS = 1.0


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can cause; each is shown as its message. Anything else is a bug: one line, and the
    traceback goes to the terminal."""
    from ..errors import SftkitError

    return (SftkitError, OSError, ValueError)


def failure(error: BaseException) -> str:
    """Markdown for a failed action: every problem on its own line; unexpected errors logged to the terminal."""
    if isinstance(error, ConfigError):
        return "**Please fix:**\n" + "\n".join(f"- {problem}" for problem in error.problems)
    if not isinstance(error, user_errors()):
        traceback.print_exc()
        return f"**Unexpected error** ({type(error).__name__}): {error}. The web-ui terminal has the details."
    return f"**Error:** {error}"


class Server:
    """What outlives a page: the training job (so a reload re-attaches) and the model loaded for chat."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.job: jobs.TrainJob | None = None
        self.job_overrides: dict = {}
        self._chat_key, self._chat_model = None, None
        self._guides: dict = {}  # (template name, scored, grounded) -> ToolCallGuide for the loaded model's tokenizer
        self._lock = threading.Lock()

    def chat_model(self, config: ChatConfig):
        """(model, tokenizer, settings) for a chat config, reloaded only when the checkpoint, base or dtype change."""
        from ..inference import load_for_inference

        key = (config.ckpt_dir, config.model, config.dtype)
        with self._lock:
            if key != self._chat_key:
                self._chat_key, self._chat_model, self._guides = None, None, {}
                self._chat_model = load_for_inference(config.ckpt_dir, config.model, dtype=config.dtype)
                self._chat_key = key
            return self._chat_model

    def tool_guide(self, tokenizer, template: str, scored: bool = True, grounded: bool = False):
        """The loaded model's ToolCallGuide for a template, built once (None: the template has no call markers)."""
        from ..constrained import tool_call_guide

        with self._lock:
            if (template, scored, grounded) not in self._guides:
                self._guides[template, scored, grounded] = tool_call_guide(tokenizer, template, scored, grounded)
            return self._guides[template, scored, grounded]

    def checkpoints(self) -> list[tuple[str, str]]:
        return jobs.checkpoint_choices(self.output_dir)

    def shutdown(self) -> None:
        """A running job is stopped as Ctrl-C would: it saves a checkpoint before exiting."""
        if self.job is not None and self.job.running:
            self.job.stop()
            self.job.wait(timeout=120)


# --- widgets from config fields -------------------------------------------------------------------------------


def widget(spec: forms.FieldSpec, prefix: str):
    common = dict(label=spec.name, info=spec.help, elem_id=f"{prefix}-{spec.name}")
    if spec.kind == "choice":
        choices = [("(default)" if choice == "" else choice, choice) for choice in spec.choices]
        return gr.Dropdown(choices=choices, value=spec.value, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.value, **common)
    if spec.kind == "int":
        return gr.Number(value=spec.value, precision=0, **common)
    if spec.kind == "float":
        return gr.Number(value=spec.value, step=0.01, **common)
    return gr.Textbox(value=spec.value, placeholder=forms.default_hint(spec) if spec.optional else None,
                      type="password" if forms.is_secret(spec.name) else "text", **common)


def fields_block(specs: list[forms.FieldSpec], prefix: str, per_row: int = 3) -> dict:
    components = {}
    for start in range(0, len(specs), per_row):
        with gr.Row():
            for spec in specs[start:start + per_row]:
                components[spec.name] = widget(spec, prefix)
    return components


def named(components: dict, values) -> dict:
    return dict(zip(components, values))


def checkpoint_dropdown(server: Server, prefix: str, spec: forms.FieldSpec):
    """ckpt_dir as a list of every run's best and latest checkpoint that also takes any typed path."""
    return gr.Dropdown(choices=server.checkpoints(), value=None, allow_custom_value=True, label=spec.name,
                       info=spec.help + " (pick a run's best/latest, or type any path)", elem_id=f"{prefix}-{spec.name}")


# --- Train ----------------------------------------------------------------------------------------------------


def train_initial(output_dir: str) -> dict:
    """The embedded default model (model left blank) and the bundled data preselected, so Start trains at once."""
    initial = {"output_dir": output_dir}
    try:
        initial["dataset"] = bundled("chat.jsonl")
    except FileNotFoundError:  # an install without the examples: the field stays blank and says so when started
        pass
    return initial


def train_monitor() -> dict:
    """The Train tab's right column: start/stop, the command, progress, the loss plot, the best checkpoint, the log."""
    panel = {}
    with gr.Row():
        panel["start"] = gr.Button("Start", variant="primary", elem_id="train-start")
        panel["stop"] = gr.Button("Stop", variant="stop", interactive=False, elem_id="train-stop")
    panel["command"] = gr.Textbox(label="the same run from a terminal", value="sftkit train", interactive=False,
                                  buttons=["copy"], elem_id="train-command")
    panel["status"] = gr.Markdown("No run yet.", elem_id="train-status")
    panel["bar"] = gr.HTML("", elem_id="train-progress")
    # Drawn on the server: gradio's own line plots fix their series from the first value they get.
    panel["loss_plot"] = gr.Plot(label="loss", show_label=False, format="png", elem_id="train-loss-plot")
    panel["best"] = gr.Textbox(label="best checkpoint", interactive=False, elem_id="train-best")
    with gr.Row():
        panel["chat"] = gr.Button("Chat with it", interactive=False, elem_id="train-chat")
        panel["evaluate"] = gr.Button("Evaluate it", interactive=False, elem_id="train-evaluate")
        panel["merge"] = gr.Button("Merge it", interactive=False, elem_id="train-merge")
    panel["merged"] = gr.Markdown("", elem_id="train-merged")
    panel["log"] = gr.Textbox(label="log", lines=14, max_lines=14, interactive=False, autoscroll=True, elem_id="train-log")
    return panel


def train_tab(server: Server) -> dict:
    specs = forms.field_specs(TrainConfig, train_initial(server.output_dir))
    form = {}
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("Every option of `sftkit train`; a blank model field trains the embedded SmolLM2-135M-Instruct.")
            for title, group in forms.group_specs(specs, forms.TRAIN_GROUPS).items():
                group_id = f"train-group-{title.split()[0].lower()}"
                with gr.Accordion(title, open=title in forms.OPEN_GROUPS, elem_id=group_id):
                    form.update(fields_block(group, "train"))
        with gr.Column(scale=2):
            panel = train_monitor()
    start, stop, command, status, bar, loss_plot, best, chat_button, eval_button, merge_button, merged, log = (
        panel[name] for name in ("start", "stop", "command", "status", "bar", "loss_plot", "best", "chat", "evaluate",
                                 "merge", "merged", "log"))
    timer = gr.Timer(POLL_SECONDS, active=False)
    plotted = gr.State(0)  # how many records this page's loss plot shows: redraw only when more arrive
    watched = [status, bar, loss_plot, plotted, best, log, timer, start, stop, chat_button, eval_button, merge_button]

    def watch(shown_records: int = 0, message: str | None = None):
        return watch_job(server, shown_records, message)

    def on_start(*values):
        if server.job is not None and server.job.running:
            return watch(0, "**A run is already going:** stop it first.") + (gr.skip(),)
        try:
            config, changed = forms.parse_form(TrainConfig, named(form, values))
            shown = forms.cli_command("train", changed)
            server.job = jobs.TrainJob(forms.cli_args(changed), os.path.join(config.output_dir, "webui-logs"), shown)
        except Exception as error:  # the page's boundary: every failure becomes a message in the page
            return watch(0, failure(error)) + (gr.skip(),)
        server.job_overrides = changed
        return watch() + (shown,)

    def on_stop(shown_records: int):
        if server.job is not None:
            server.job.stop()
        return watch(shown_records)

    def preview_command(*values):
        changed = forms.overrides(TrainConfig, named(form, values))
        return forms.cli_command("train", changed)

    def on_load():
        """A reloaded page shows the running (or last) job with the options it was started with."""
        if server.job is None:
            return watch() + (gr.skip(),) + tuple(gr.skip() for _ in form)
        by_name = {spec.name: spec for spec in specs}
        values = {name: forms.shown(value, by_name[name].kind) for name, value in server.job_overrides.items()}
        return watch() + (server.job.command,) + tuple(values.get(name, by_name[name].value) for name in form)

    inputs = list(form.values())
    start.click(on_start, inputs, watched + [command])
    stop.click(on_stop, plotted, watched)
    timer.tick(watch, plotted, watched, show_progress="hidden")
    gr.on([component.change for component in inputs], preview_command, inputs, command, show_progress="hidden",
          trigger_mode="always_last")
    merge_button.click(lambda: "Merging…", None, merged).then(merge_checkpoint, best, merged)
    return {"load": (on_load, watched + [command] + inputs), "best": best, "chat": chat_button, "evaluate": eval_button}


def watch_job(server: Server, shown_records: int = 0, message: str | None = None):
    """Everything the right column shows, read from the job's log and run folder."""
    job = server.job
    if job is None:
        return (message or "No run yet.", "", gr.skip(), 0, "", "", gr.Timer(active=False),
                gr.Button(interactive=True), gr.Button(interactive=False), *[gr.Button(interactive=False)] * 3)
    log_text = job.log_text()
    run_dir = jobs.run_folder(log_text)
    records = jobs.read_records(run_dir)
    state = jobs.progress(records)
    running = job.running
    lines = [f"**{job.status()}**" + (f" · run folder `{run_dir}`" if run_dir else "")]
    evaluation = jobs.last_evaluation(records)
    if evaluation:
        lines.append(f"last evaluation, {evaluation}")
    if not running and job.process.returncode and not job.stop_requested:
        lines.append(jobs.error_line(log_text) or "see the log below")
    if message:
        lines.insert(0, message)
    fraction = state["step"] / state["total_steps"] if state else 0.0
    if not running and job.process.returncode == 0 and not job.stop_requested:
        fraction = 1.0
    bar_html = (f'<div class="sftkit-bar"><div style="width: {100 * fraction:.1f}%"></div></div>'
                f"<p>{jobs.progress_text(state) if running or state else ''}</p>")
    checkpoint = (pointer(run_dir, BEST) or pointer(run_dir, LATEST)) if run_dir and not running else None
    plot = loss_figure(records) if records and len(records) != shown_records else gr.skip()
    return ("\n\n".join(lines), bar_html, plot, len(records), checkpoint or "", jobs.log_tail(log_text),
            gr.Timer(active=running), gr.Button(interactive=not running), gr.Button(interactive=running),
            *[gr.Button(interactive=checkpoint is not None)] * 3)


def merge_checkpoint(checkpoint: str) -> str:
    """The Merge button: the checkpoint merged as `sftkit merge` does, or what went wrong."""
    from ..chat import merge

    try:
        output_dir = merge(build_config(MergeConfig, None, {"ckpt_dir": checkpoint}))
    except Exception as error:  # the page's boundary: every failure becomes a message in the page
        return failure(error)
    return (f"Merged model written to `{output_dir}`: plain transformers loads it "
            f"(`sftkit merge --ckpt_dir {checkpoint}` does the same).")


# --- Chat -----------------------------------------------------------------------------------------------------


def chat_tab(server: Server) -> dict:
    specs = {spec.name: spec for spec in forms.field_specs(ChatConfig)}
    form = {}
    with gr.Row():
        with gr.Column(scale=2):
            form["ckpt_dir"] = checkpoint_dropdown(server, "chat", specs["ckpt_dir"])
            refresh = gr.Button("Refresh checkpoints", size="sm", elem_id="chat-refresh")
            form.update(fields_block([specs[name] for name in ("model", "template", "dtype")], "chat", per_row=1))
            form["system"] = gr.Textbox(lines=3, label="system", info=specs["system"].help,
                                        placeholder=forms.default_hint(specs["system"]), elem_id="chat-system")
            form["agent"] = gr.Checkbox(label="agent", elem_id="chat-agent",
                                        info="after a tool call, the next message you send is the tool's result")
            with gr.Accordion("sampling", open=False, elem_id="chat-sampling"):
                sampling = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
                form.update(fields_block([specs[name] for name in sampling], "chat", per_row=2))
            # `stream` is the terminal's choice (the page always streams); every other option is offered here.
            rest = [spec for name, spec in specs.items() if name not in form and name != "stream"]
            if rest:
                with gr.Accordion("more options", open=False, elem_id="chat-more"):
                    form.update(fields_block(rest, "chat", per_row=1))
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="chat", height=480, buttons=["copy", "copy_all"], elem_id="chat-bot")
            message = gr.Textbox(label="message", placeholder="Type a message and press Enter", elem_id="chat-message")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat-send")
                clear = gr.Button("Clear history", elem_id="chat-clear")
            status = gr.Markdown("", elem_id="chat-status")
    form = {name: form[name] for name in specs if name in form}
    history = gr.State([])
    awaiting = gr.State(False)  # the model called a tool: the next message is that tool's result

    def on_send(text: str, past: list[Message], waiting: bool, *values):
        yield from send_message(server, list(form), text, past, waiting, values)

    outputs = [chatbot, history, awaiting, message, status]
    inputs = [message, history, awaiting, *form.values()]
    send.click(on_send, inputs, outputs)
    message.submit(on_send, inputs, outputs)
    clear.click(lambda: ([], [], False, message_box(False), ""), None, outputs)
    chatbot.clear(lambda: ([], False, message_box(False), ""), None, outputs[1:])
    refresh.click(lambda: gr.Dropdown(choices=server.checkpoints()), None, form["ckpt_dir"])
    return {"ckpt_dir": form["ckpt_dir"]}


def message_box(waiting: bool):
    """The message box, labelled for a tool's result while the model waits for one."""
    if waiting:
        return gr.Textbox(value="", label="tool result", placeholder="The model called a tool: paste its result")
    return gr.Textbox(value="", label="message", placeholder="Type a message and press Enter")

def send_message(server: Server, names: list[str], text: str, past: list[Message], waiting: bool, values):
    """One chat turn from the page, streamed: (chat, history, awaiting a tool result, message box, status) updates."""
    from ..generation import generation_config
    from .turns import stream_turn

    if not text.strip():
        yield gr.skip(), past, waiting, gr.skip(), ""
        return
    try:
        config, _ = forms.parse_form(ChatConfig, named(names, values))
        asked = past + [Message("tool" if waiting else "user", text)]
        yield views.chat_messages(asked), past, waiting, message_box(False), "Loading the model…"
        model, tokenizer, settings = server.chat_model(config)
        system = config.system if config.system is not None else settings.system
        template = config.template or settings.template
        guide = server.tool_guide(tokenizer, template, config.score_tool_calls,
                                  config.ground_tool_values) if config.agent and config.constrained_tool_calls else None
        started = time.time()
        for conversation, calling in stream_turn(model, tokenizer, template, system, past, text,
                                                 generation_config(config), agent=config.agent,
                                                 tool_result=waiting, guide=guide):
            yield views.chat_messages(conversation), past, waiting, gr.skip(), ""
    except Exception as error:  # the page's boundary: every failure becomes a message in the page
        yield views.chat_messages(past), past, waiting, message_box(waiting), failure(error)
        return
    note = f"answered in {time.time() - started:.1f}s" + (
        "; the model called a tool: type the tool's result and send it." if calling else "")
    yield views.chat_messages(conversation), conversation, calling, message_box(calling), note


# --- Evaluate -------------------------------------------------------------------------------------------------


def eval_tab(server: Server) -> dict:
    from ..evaluate import evaluate_checkpoint

    specs = {spec.name: spec for spec in forms.field_specs(EvalConfig)}
    what = ("ckpt_dir", "model", "dataset", "metrics", "limit", "batch_size", "output", "check_dataset_strategy")
    form = {}
    with gr.Row():
        with gr.Column(scale=2):
            form["ckpt_dir"] = checkpoint_dropdown(server, "eval", specs["ckpt_dir"])
            form.update(fields_block([specs[name] for name in what[1:]], "eval", per_row=2))
            with gr.Accordion("generation", open=False, elem_id="eval-generation"):
                form.update(fields_block([spec for name, spec in specs.items() if name not in what], "eval", per_row=2))
            run = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
            command = gr.Textbox(label="the same from a terminal", interactive=False, buttons=["copy"],
                                 elem_id="eval-command")
            status = gr.Markdown("", elem_id="eval-status")
        with gr.Column(scale=3):
            metrics = gr.Dataframe(headers=["metric", "value"], label="metrics", interactive=False, elem_id="eval-scores")
            order = gr.Radio(["worst first", "best first"], value="worst first", label="examples by score (ROUGE-L)",
                             elem_id="eval-order")
            examples = gr.Dataframe(headers=["index", "score", "prompt", "reference", "prediction"], label="examples",
                                    interactive=False, wrap=True, max_height=600, elem_id="eval-examples")
    form = {name: form[name] for name in specs}
    report_state = gr.State(None)

    def on_run(best_order: str, *values):
        try:
            config, changed = forms.parse_form(EvalConfig, named(form, values))
            shown = forms.cli_command("eval", changed)
            yield gr.skip(), gr.skip(), None, shown, "Evaluating… (loading the model, then generating)"
            report = evaluate_checkpoint(config)
        except Exception as error:  # the page's boundary: every failure becomes a message in the page
            yield gr.skip(), gr.skip(), None, gr.skip(), failure(error)
            return
        yield (views.metric_rows(report), views.example_rows(report, best_order == "best first"), report, shown,
               f"Report written to `{report['output']}`.")

    def on_order(best_order: str, report: dict | None):
        return gr.skip() if report is None else views.example_rows(report, best_order == "best first")

    run.click(on_run, [order, *form.values()], [metrics, examples, report_state, command, status])
    order.change(on_order, [order, report_state], examples)
    return {"ckpt_dir": form["ckpt_dir"]}


# --- Data -----------------------------------------------------------------------------------------------------


def data_tab(server: Server) -> None:
    from ..data.preview import build_preview, trainable_runs
    from ..model import load_tokenizer, resolve_model_dir

    specs = [spec for spec in forms.field_specs(PreviewConfig) if spec.name != "color"]  # the page always highlights
    with gr.Row():
        with gr.Column(scale=2):
            form = fields_block(specs, "data", per_row=2)
            run = gr.Button("Preview", variant="primary", elem_id="data-run")
            status = gr.Markdown("", elem_id="data-status")
        with gr.Column(scale=3):
            tokens = gr.HighlightedText(label="examples (trained tokens highlighted)", color_map={views.TRAINED: "green"},
                                        show_legend=True, elem_id="data-tokens")
            lengths = gr.Plot(label="tokens per example", show_label=False, format="png", elem_id="data-lengths")
    tokenizers: dict = {}

    def on_preview(*values):
        try:
            config, _ = forms.parse_form(PreviewConfig, named(form, values))
            if config.tokenizer not in tokenizers:
                tokenizers[config.tokenizer] = load_tokenizer(resolve_model_dir(config.tokenizer))
            tokenizer = tokenizers[config.tokenizer]
            result = build_preview(config, tokenizer)
        except Exception as error:  # the page's boundary: every failure becomes a message in the page
            return gr.skip(), gr.skip(), failure(error)
        spans = views.highlighted([trainable_runs(tokenizer, example) for example in result.examples])
        stats = result.stats
        text = (f"{result.summary}\n\ntokens per example: "
                + ", ".join(f"{key} {value}" for key, value in stats["tokens"].items())
                + f"; truncated to {config.max_length}: {stats['truncated']}; dropped with no trainable token left: "
                  f"{stats['dropped_no_trainable_token']}")
        return spans, views.length_figure(result.lengths), text

    run.click(on_preview, list(form.values()), [tokens, lengths, status])


# --- the page -------------------------------------------------------------------------------------------------


def build_app(config: WebUIConfig) -> tuple[gr.Blocks, Server]:
    server = Server(config.output_dir)
    with gr.Blocks(title="sftkit", analytics_enabled=False) as demo:
        gr.Markdown("## sftkit — fine-tune, watch, chat, evaluate")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab(server)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat = chat_tab(server)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate"):
                evaluation = eval_tab(server)
            with gr.Tab("Data", id="data", elem_id="tab-data"):
                data_tab(server)

        def open_with(tab: str):
            def handler(checkpoint: str):
                return gr.Tabs(selected=tab), gr.Dropdown(choices=server.checkpoints(), value=checkpoint)
            return handler

        train["chat"].click(open_with("chat"), train["best"], [tabs, chat["ckpt_dir"]])
        train["evaluate"].click(open_with("evaluate"), train["best"], [tabs, evaluation["ckpt_dir"]])
        on_load, outputs = train["load"]
        demo.load(on_load, None, outputs)
    return demo, server


def launch(config: WebUIConfig) -> None:
    """Serve the page until Ctrl-C; a training job still running then is stopped and saves its checkpoint."""
    demo, server = build_app(config)
    theme = gr.themes.Default(font=FONTS, font_mono=["ui-monospace", "monospace"])
    try:
        demo.queue().launch(server_name=config.host, server_port=config.port, auth=config.credentials, theme=theme,
                            css=CSS, ssr_mode=False, show_error=False, pwa=False, mcp_server=False, share=False)
    finally:
        server.shutdown()
