"""The mesh view, the banner and the help screen, driven through Textual's pilot at 80x24."""

from __future__ import annotations

from rich.text import Text

from tests.tui.pilot_tools import app_wait_until, screen_text
from tui.app import MeshApp
from tui.demo import FakeClient, node, status
from tui.help import HelpScreen
from tui.settings import TuiSettings
from tui.widgets.event_log import EventLog
from tui.widgets.layer_map import FULL_BLOCK, LayerMap, node_colours
from tui.widgets.nodes_table import NodesTable

FAST_RECONNECT = TuiSettings(reconnect_initial_s=0.01, reconnect_max_s=0.05)

LAPTOP = node("n-laptop", "laptop", (0, 12), is_self=True, coordinator=True, mem_gib=7.5, ms_per_layer=1.92)
DESKTOP = node("n-desktop", "desktop", (12, 30), mem_gib=15.6, ms_per_layer=0.84, rtt_ms=0.71)
TWO_NODES = status([LAPTOP, DESKTOP], term=3)


def three_nodes() -> dict:
    return status([
        node("n-laptop", "laptop", (0, 10), is_self=True, coordinator=True, mem_gib=7.5, ms_per_layer=1.92),
        node("n-desktop", "desktop", (10, 24), mem_gib=15.6, ms_per_layer=0.84, rtt_ms=0.71),
        node("n-phone", "phone", (24, 30), mem_gib=2.0, ms_per_layer=6.3, rtt_ms=4.25),
    ], term=3)


def table_rows(app: MeshApp) -> dict[str, list[str]]:
    table = app.query_one(NodesTable)
    return {str(key.value): [str(cell) for cell in table.get_row(key)] for key in table.rows}


def log_text(app: MeshApp) -> str:
    """The event log's text, with wrapped lines joined back (single spaces)."""
    return " ".join(" ".join(strip.text.split()) for strip in app.query_one(EventLog).lines)


def make_app(fake: FakeClient) -> MeshApp:
    return MeshApp(fake, settings=FAST_RECONNECT, initial_view="mesh")


async def test_the_table_and_the_layer_map_show_the_plan() -> None:
    fake = FakeClient()
    fake.push_status(TWO_NODES)
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await app_wait_until(pilot, lambda: len(table_rows(app)) == 2, "two rows in the table")
        rows = table_rows(app)
        assert rows["n-laptop"] == ["laptop", "●", "coord", "ready", "7.50 GiB", "63.0 MiB", "1.92", "[0, 12)", "—",
                                    "—", "—"]
        assert rows["n-desktop"] == ["desktop", "", "member", "ready", "15.6 GiB", "81.0 MiB", "0.84", "[12, 30)",
                                     "0.71 ms", "—", "—"]

        layer_map = app.query_one(LayerMap)
        assert layer_map.owners == ("n-laptop",) * 12 + ("n-desktop",) * 18
        # the bar: the first 12/30 of the cells in the laptop's colour, the rest in the desktop's
        rendered = layer_map.render()
        assert isinstance(rendered, Text)
        bar = rendered.split("\n")[0]
        colours = node_colours(app.mesh_status)  # type: ignore[arg-type]
        cells = [str(bar.get_style_at_offset(app.console, i).color.name).lower() for i in range(len(bar))]
        width = len(bar)
        assert bar.plain == FULL_BLOCK * width and width >= 70
        assert cells[0] == cells[width * 12 // 30 - 1] == colours["n-laptop"]
        assert cells[width * 12 // 30 + 1] == cells[-1] == colours["n-desktop"]

        screen = screen_text(app)
        assert "laptop [0, 12)" in screen and "desktop [12, 30)" in screen  # the legend
        assert "SmolLM2-135M-Instruct (30 layers, int4)" in screen
        assert "codec f16" in screen and "term 3" in screen and "plan active" in screen
        assert "connected to the daemon at http://127.0.0.1:8470" in log_text(app)
        assert not app.query_one("#banner").display


async def test_a_join_a_leave_and_a_replan_show_in_the_table_and_the_log() -> None:
    fake = FakeClient()
    fake.push_status(TWO_NODES)
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await app_wait_until(pilot, lambda: len(table_rows(app)) == 2, "two rows")

        fake.push_status(three_nodes())
        await app_wait_until(pilot, lambda: "n-phone" in table_rows(app), "the phone's row")
        assert table_rows(app)["n-phone"][7] == "[24, 30)"
        assert app.query_one(LayerMap).owners[24:] == ("n-phone",) * 6
        await app_wait_until(pilot, lambda: "phone joined" in log_text(app), "a join line")
        assert "new plan (term 3, active): laptop [0, 10), desktop [10, 24), phone [24, 30)" in log_text(app)

        # the laptop (coordinator) leaves: the desktop wins term 4 and re-plans
        fake.push_status(status([
            node("n-desktop", "desktop", (0, 20), coordinator=True),
            node("n-phone", "phone", (20, 30)),
        ], term=4, self_id="n-desktop"))
        await app_wait_until(pilot, lambda: "n-laptop" not in table_rows(app), "the laptop's row gone")
        await app_wait_until(pilot, lambda: "laptop left" in log_text(app), "a leave line")
        assert "term 4: desktop is the coordinator" in log_text(app)
        assert "new plan (term 4, active): desktop [0, 20), phone [20, 30)" in log_text(app)
        assert table_rows(app)["n-desktop"][2] == "coord"

        fake.push_log("error", "link to phone: heartbeat missed")
        await app_wait_until(pilot, lambda: "heartbeat missed" in log_text(app), "the daemon's own line")
        await app_wait_until(pilot, lambda: "error" in screen_text(app), "the line's kind on screen")


async def test_daemon_gone_shows_a_banner_and_reconnects_when_it_is_back() -> None:
    fake = FakeClient()
    fake.push_status(TWO_NODES)
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await app_wait_until(pilot, lambda: app.connected, "connected")
        fake.go_away()
        await app_wait_until(pilot, lambda: not app.connected and app.query_one("#banner").display, "the banner")
        await app_wait_until(pilot, lambda: "Trying again in" in app.banner_text, "the banner's text")
        await app_wait_until(pilot, lambda: "Lost the daemon at http://127.0.0.1:8470" in screen_text(app),
                             "the banner on screen")
        assert "Traceback" not in screen_text(app)
        assert "lost the daemon" in log_text(app)
        assert len(table_rows(app)) == 2  # the last known mesh stays on screen
        tries = fake.connections

        fake.come_back()
        fake.push_status(three_nodes())
        await app_wait_until(pilot, lambda: app.connected, "connected again")
        await app_wait_until(pilot, lambda: "n-phone" in table_rows(app), "the new snapshot shown")
        assert fake.connections == tries + 1 and fake.open_streams == 1
        assert not app.query_one("#banner").display
        assert "the daemon is back" in log_text(app)
        assert "phone joined" in log_text(app)  # what changed while away is still told


async def test_starting_before_the_daemon_waits_for_it() -> None:
    fake = FakeClient()
    fake.available = False
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await app_wait_until(pilot, lambda: "try 3" in app.banner_text, "retries")
        await app_wait_until(pilot, lambda: "Waiting for the daemon at http://127.0.0.1:8470" in screen_text(app),
                             "the banner on screen")
        assert fake.connections == 0
        fake.push_status(TWO_NODES)
        fake.come_back()
        await app_wait_until(pilot, lambda: len(table_rows(app)) == 2, "the mesh shown")
        assert not app.query_one("#banner").display


async def test_resizing_to_120x40_and_back() -> None:
    fake = FakeClient()
    fake.push_status(three_nodes())
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await app_wait_until(pilot, lambda: len(table_rows(app)) == 3, "three rows")
        for width, height in ((120, 40), (80, 24), (60, 20), (80, 24)):
            await pilot.resize_terminal(width, height)
            await app_wait_until(pilot, lambda: app.size == (width, height), f"resized to {width}x{height}")
            await pilot.pause()
            screen = screen_text(app).splitlines()
            assert len(screen) == height and all(len(line) <= width for line in screen)
            bar_rows = [line for line in screen if FULL_BLOCK * 10 in line]
            assert bar_rows and bar_rows[0].count(FULL_BLOCK) == width - 2  # the bar spans the width
            assert any("phone" in line for line in screen)


async def test_f1_and_question_mark_open_the_help_and_escape_closes_it() -> None:
    fake = FakeClient()
    fake.push_status(TWO_NODES)
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await app_wait_until(pilot, lambda: app.connected, "connected")
        for key in ("f1", "question_mark"):
            await pilot.press(key)
            await app_wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), f"help after {key}")
            screen = screen_text(app)
            for words in ("stop the answer in progress", "new chat", "the mesh", "quit"):
                assert words in screen
            await pilot.press("escape")
            await app_wait_until(pilot, lambda: not isinstance(app.screen, HelpScreen), "help closed")
        footer = screen_text(app).splitlines()[-1]
        assert "Help" in footer and "Chat" in footer and "Quit" in footer
        assert "Stop" not in footer  # chat keys show on the chat view only


async def test_f2_and_f3_switch_views() -> None:
    fake = FakeClient()
    fake.push_status(TWO_NODES)
    app = make_app(fake)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f3")
        await app_wait_until(pilot, lambda: app.active_view == "chat", "the chat view")
        assert app.focused is not None and app.focused.id == "prompt"
        assert "New chat" in screen_text(app).splitlines()[-1]
        await pilot.press("f2")
        await app_wait_until(pilot, lambda: app.active_view == "mesh", "the mesh view")
        assert isinstance(app.focused, NodesTable)
