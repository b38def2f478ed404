"""The chat view, driven through Textual's pilot at 80x24 against a fake daemon."""

from __future__ import annotations

from textual.pilot import Pilot
from textual.widgets import Input

from tests.tui.pilot_tools import app_wait_until, screen_text
from tui.app import MeshApp
from tui.client import DaemonError
from tui.demo import ChatCall, FakeClient, node, status
from tui.settings import TuiSettings
from tui.widgets.chat_log import ChatLog

SETTINGS = TuiSettings(chat_max_tokens=200, chat_temperature=0.0,
                       reconnect_initial_s=0.01, reconnect_max_s=0.05)
MESH = status([node("n-laptop", "laptop", (0, 30), is_self=True, coordinator=True)])


def make_app() -> tuple[MeshApp, FakeClient]:
    fake = FakeClient()
    fake.push_status(MESH)
    return MeshApp(fake, settings=SETTINGS, initial_view="chat"), fake


def entries(app: MeshApp) -> list[tuple[str, str]]:
    return [(entry.role, entry.text) for entry in app.query_one(ChatLog).entries]


def chat_status(app: MeshApp) -> str:
    return str(app.query_one("#chat-status").render())


async def ask(pilot: Pilot[object], fake: FakeClient, prompt: str) -> ChatCall:
    """Put ``prompt`` in the input (as a paste would), press Enter; return the chat call made."""
    before = len(fake.chats)
    pilot.app.query_one("#prompt", Input).insert_text_at_cursor(prompt)
    await pilot.press("enter")
    await app_wait_until(pilot, lambda: len(fake.chats) == before + 1, f"the question {prompt!r} sent")
    return fake.chats[-1]


async def test_an_answer_streams_in_with_tokens_per_second() -> None:
    app, fake = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await app_wait_until(pilot, lambda: app.connected, "connected")
        call = await ask(pilot, fake, "hi there")
        assert call.messages == [{"role": "user", "content": "hi there"}]
        assert (call.max_tokens, call.temperature) == (200, 0.0)
        assert app.query_one("#prompt", Input).value == ""

        for piece in ("Hello", ",", " I am", " a mesh"):
            call.send(piece)
        await app_wait_until(pilot, lambda: ("assistant", "Hello, I am a mesh") in entries(app), "the streamed text")
        assert "streaming · 4 tokens" in chat_status(app)
        assert "Hello, I am a mesh" in screen_text(app)
        assert "Stop answer" in screen_text(app).splitlines()[-1]  # the footer offers Esc

        call.send(".")
        call.finish("stop")
        await app_wait_until(pilot, lambda: "done" in chat_status(app), "the answer finished")
        assert "5 tokens" in chat_status(app) and "tok/s" in chat_status(app)
        assert entries(app) == [("user", "hi there"), ("assistant", "Hello, I am a mesh.")]

        second = await ask(pilot, fake, "and then?")
        assert second.messages == [  # the whole conversation goes with each turn
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "Hello, I am a mesh."},
            {"role": "user", "content": "and then?"},
        ]
        second.send("Then nothing.")
        second.finish("length")
        await app_wait_until(pilot, lambda: "token limit" in chat_status(app), "a cut answer")
        assert ("note", "cut off at the 200-token limit") in entries(app)


async def test_escape_stops_the_answer_and_keeps_what_came() -> None:
    app, fake = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        call = await ask(pilot, fake, "count to ten")
        call.send("one two")
        call.send(" three")
        await app_wait_until(pilot, lambda: ("assistant", "one two three") in entries(app), "part of the answer")
        await pilot.press("escape")
        await app_wait_until(pilot, lambda: call.cancelled, "the stream closed")
        await app_wait_until(pilot, lambda: not app.chat_view.streaming, "streaming over")
        assert entries(app)[:2] == [("user", "count to ten"), ("assistant", "one two three")]
        assert entries(app)[2][0] == "note" and entries(app)[2][1].startswith("stopped after 2 tokens")
        assert "Stop answer" not in screen_text(app).splitlines()[-1]

        nxt = await ask(pilot, fake, "go on")
        assert nxt.messages[1] == {"role": "assistant", "content": "one two three"}
        call_b = nxt
        call_b.send("four")
        await app_wait_until(pilot, lambda: ("assistant", "four") in entries(app), "the next answer")
        await pilot.press("ctrl+s")  # the other stop key
        await app_wait_until(pilot, lambda: call_b.cancelled, "the second stream closed")


async def test_ctrl_n_starts_a_new_empty_chat() -> None:
    app, fake = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        call = await ask(pilot, fake, "remember 42")
        call.send("Noted.")
        call.finish()
        await app_wait_until(pilot, lambda: "done" in chat_status(app), "the first answer")

        second = await ask(pilot, fake, "and now?")
        second.send("Still")
        await app_wait_until(pilot, lambda: ("assistant", "Still") in entries(app), "a second answer streaming")
        await pilot.press("ctrl+n")  # mid-answer: it is stopped and everything goes
        await app_wait_until(pilot, lambda: second.cancelled, "the streaming answer cancelled")
        await app_wait_until(pilot, lambda: entries(app) == [], "an empty chat")
        assert app.chat_view.messages == [] and not app.chat_view.streaming
        await app_wait_until(pilot, lambda: "Enter sends" in screen_text(app), "the empty chat on screen")
        screen = screen_text(app)
        assert "Noted." not in screen and "Still" not in screen

        fresh = await ask(pilot, fake, "hello")
        assert fresh.messages == [{"role": "user", "content": "hello"}]


async def test_the_replanning_indicator_shows_until_tokens_flow_again() -> None:
    app, fake = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        call = await ask(pilot, fake, "long answer please")
        call.send("Once upon")
        await app_wait_until(pilot, lambda: ("assistant", "Once upon") in entries(app), "the first tokens")
        assert not app.chat_view.is_replanning_shown

        call.state("replanning")
        await app_wait_until(pilot, lambda: app.chat_view.is_replanning_shown, "the indicator")
        await app_wait_until(pilot, lambda: "re-planning…" in screen_text(app), "re-planning on screen")

        call.state("running")
        call.send(" a time")
        await app_wait_until(pilot, lambda: not app.chat_view.is_replanning_shown, "the indicator gone")
        await app_wait_until(pilot, lambda: ("assistant", "Once upon a time") in entries(app), "more tokens")
        assert "re-planning…" not in screen_text(app)

        call.state("replanning")  # tokens alone also end it
        await app_wait_until(pilot, lambda: app.chat_view.is_replanning_shown, "the indicator again")
        call.send(".")
        await app_wait_until(pilot, lambda: not app.chat_view.is_replanning_shown, "gone with the next token")
        call.state("replanning")
        await app_wait_until(pilot, lambda: app.chat_view.is_replanning_shown, "and again")
        call.finish()
        await app_wait_until(pilot, lambda: not app.chat_view.is_replanning_shown, "gone when the answer ends")


async def test_a_refused_question_comes_back_to_the_input() -> None:
    app, fake = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        call = await ask(pilot, fake, "a very long question")
        call.fail(DaemonError("the prompt is 9000 tokens; the model takes 8192"))
        await app_wait_until(pilot, lambda: not app.chat_view.streaming, "the answer over")
        assert entries(app) == [
            ("user", "a very long question"),
            ("error", "The daemon could not answer: the prompt is 9000 tokens; the model takes 8192"),
        ]
        assert app.chat_view.messages == []
        assert app.query_one("#prompt", Input).value == "a very long question"


async def test_a_question_without_a_daemon_says_so_calmly() -> None:
    app, fake = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await app_wait_until(pilot, lambda: app.connected, "connected")
        fake.go_away()
        await app_wait_until(pilot, lambda: not app.connected, "the daemon gone")
        await pilot.press(*"anyone?")  # typed key by key
        await pilot.press("enter")
        await app_wait_until(pilot, lambda: any(role == "error" for role, _ in entries(app)), "an error line")
        assert "The daemon is not reachable" in entries(app)[-1][1]
        await app_wait_until(pilot, lambda: "Lost the daemon" in screen_text(app), "the banner on screen")
        assert "Traceback" not in screen_text(app)
        assert app.query_one("#prompt", Input).value == "anyone?"

        fake.come_back()
        await app_wait_until(pilot, lambda: app.connected, "back")
        await pilot.press("enter")
        await app_wait_until(pilot, lambda: len(fake.chats) == 1, "sent again")
        assert fake.chats[0].messages == [{"role": "user", "content": "anyone?"}]


async def test_a_fast_stream_ends_with_every_token_on_screen() -> None:
    app, fake = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        call = await ask(pilot, fake, "spam")
        pieces = [f"w{i} " for i in range(1500)]
        for piece in pieces:
            call.send(piece)
        call.finish()
        await app_wait_until(pilot, lambda: "done" in chat_status(app), "the answer finished")
        assert entries(app)[-1] == ("assistant", "".join(pieces))
        assert "1500 tokens" in chat_status(app)


async def test_question_marks_go_into_the_prompt_not_the_help() -> None:
    app, fake = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press(*"why?")
        assert app.query_one("#prompt", Input).value == "why?"
        assert app.screen is app.screen_stack[0]


async def test_an_unexpected_failure_ends_the_answer_without_a_traceback() -> None:
    app, fake = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        call = await ask(pilot, fake, "break")
        call.send("so far")
        call.fail(RuntimeError("a bug in the stream"))
        await app_wait_until(pilot, lambda: not app.chat_view.streaming, "the answer over")
        assert entries(app)[-1][0] == "error" and "a bug in the stream" in entries(app)[-1][1]
        await pilot.pause()
        assert "Traceback" not in screen_text(app)
        assert app.is_running
