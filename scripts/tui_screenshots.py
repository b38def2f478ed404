"""Write SVG screenshots of the terminal UI's two views, driven by a stand-in daemon (tui.demo).

    .venv/bin/python scripts/tui_screenshots.py [--out docs/img] [--size 100x30]

No daemon needed: a three-node mesh, a few events and a chat are played into the app.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tui.app import MeshApp  # noqa: E402
from tui.demo import FakeClient, node, status  # noqa: E402
from tui.settings import TuiSettings  # noqa: E402
from tui.widgets.chat_log import ChatLog  # noqa: E402


async def wait_until(pilot, condition, what: str, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Let the app run until ``condition()`` holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"tui_screenshots: the app never showed {what}")
        await pilot.pause(0.01)


def mesh(term: int, with_phone: bool) -> dict:
    nodes = [
        node("n-laptop", "laptop", (0, 9) if with_phone else (0, 12), is_self=True, mem_gib=7.5,
             ms_per_layer=1.92),
        node("n-desktop", "desktop", (9, 24) if with_phone else (12, 30), coordinator=True,
             mem_gib=15.6, ms_per_layer=0.84, rtt_ms=0.71),
    ]
    if with_phone:
        nodes.append(node("n-phone", "phone", (24, 30), mem_gib=2.0, ms_per_layer=6.3, rtt_ms=4.25))
    snapshot = status(nodes, term=term)
    snapshot["sessions"] = {"running": 1, "queued": 0, "max": 4, "queue_max": 16}
    return snapshot


async def shoot(out: Path, width: int, height: int) -> list[Path]:
    fake = FakeClient()
    fake.push_status(mesh(term=2, with_phone=False))
    app = MeshApp(fake, settings=TuiSettings(chat_temperature=0.0), initial_view="mesh")
    written: list[Path] = []
    async with app.run_test(size=(width, height)) as pilot:
        await wait_until(pilot, lambda: app.connected, "connected")
        start = time.time() - 60
        fake.push_log("info", "model SmolLM2-135M-Instruct ready: 30 layers, 1.92 ms per layer per token", start)
        fake.push_log("election", "term 2: desktop is the coordinator", start + 5)
        fake.push_log("replan", "new plan (term 2): laptop [0, 12), desktop [12, 30)", start + 6)
        fake.push_log("join", "phone joined (192.168.1.23, 2.0 GiB)", start + 40)
        fake.push_status(mesh(term=3, with_phone=True))
        fake.push_log("replan", "new plan (term 3): laptop [0, 9), desktop [9, 24), phone [24, 30)", start + 41)
        await pilot.pause(0.3)
        written.append(Path(app.save_screenshot("tui-mesh.svg", str(out))))

        await pilot.press("f3")
        first = "What is the capital of France?"
        app.chat_view.query_one("#prompt").insert_text_at_cursor(first)  # type: ignore[attr-defined]
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(fake.chats) == 1, "the first question")
        for piece in ("The", " capital", " of", " France", " is", " Paris", "."):
            fake.chats[0].send(piece)
            await asyncio.sleep(0.02)
        fake.chats[0].finish()
        await wait_until(pilot, lambda: not app.chat_view.streaming, "the first answer")

        second = "Name three rivers that flow through it."
        app.chat_view.query_one("#prompt").insert_text_at_cursor(second)  # type: ignore[attr-defined]
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(fake.chats) == 2, "the second question")
        for piece in ("Paris", " sits", " on", " the", " Seine", ";", " the", " Marne"):
            fake.chats[1].send(piece)
            await asyncio.sleep(0.02)
        fake.chats[1].state("replanning")
        await wait_until(pilot, lambda: app.chat_view.is_replanning_shown, "re-planning shown")
        await wait_until(pilot, lambda: "Marne" in app.query_one(ChatLog).entries[-1].text, "the text")
        await pilot.pause(0.3)
        written.append(Path(app.save_screenshot("tui-chat.svg", str(out))))
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--size", default="100x30", help="terminal size, WIDTHxHEIGHT (default 100x30)")
    args = parser.parse_args()
    width, _, height = args.size.partition("x")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(shoot(args.out, int(width), int(height))):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
