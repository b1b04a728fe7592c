"""/: the playground, a page that drives this server's API from the browser (server/static/playground: plain HTML,
CSS and JavaScript, no build step). The page is public; the calls it makes carry the API key typed into it."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.routers.docs import STATIC

router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(STATIC / "playground" / "index.html", media_type="text/html")
