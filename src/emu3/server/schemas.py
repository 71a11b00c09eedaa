"""The request bodies of every route (pydantic, strict: "3" is not a number, NaN is not a float, unknown
fields are refused)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Finite = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    user: str | None = None
    timeout: Finite | None = Field(None, gt=0)


class _Sampling(Body):
    cfg_scale: Finite | None = Field(None, ge=0, le=100)
    seed: Seed | None = None
    temperature: Finite | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=0)
    top_p: Finite | None = Field(None, gt=0, le=1)
    negative_prompt: str | None = Field(None, max_length=10000)
    stream: bool = False
    preview: bool = False  # streamed progress events carry a PNG of the rows done so far


class ImagesBody(_Sampling):
    prompt: str = Field(max_length=10000)
    n: int = Field(1, ge=1)
    size: str | None = None  # "WxH" pixels
    aspect_ratio: str | None = None  # "W:H" at the model's image area
    response_format: Literal["b64_json"] = "b64_json"


class VideosBody(_Sampling):
    prompt: str = Field(max_length=10000)
    frames: int = Field(ge=1)  # latent frames to generate (4 video frames each)
    size: str | None = None
    aspect_ratio: str | None = None
    fps: Finite | None = Field(None, gt=0, le=240)
    format: Literal["mp4", "gif", "webm"] = "mp4"
    video: str | None = None  # a base64 data URL (mp4, webm, gif) to continue: the answer is it plus `frames`


class _ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str
    detail: str | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class _ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["image_url"]
    image_url: _ImageURL


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[_TextPart | _ImagePart, Field(discriminator="type")]]
    name: str | None = None


class ChatBody(Body):
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=0)
    top_p: Finite | None = Field(None, gt=0, le=1)
    seed: Seed | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    # ["text", "image"]: the answer may hold images where the model opens them (interleaved output); with no
    # image in the messages the last user text is the start of a story the model continues
    modalities: list[Literal["text", "image"]] | None = None
    max_images: int | None = Field(None, ge=1, le=8)


class TokensBody(Body):
    prompt: list[int] = Field(min_length=1)
    negative_prompt: list[int] | None = Field(None, min_length=1)
    image: list[int] | None = Field(None, min_length=2, max_length=2)  # [h, w]: an image of this grid; else text
    max_new_tokens: int = Field(256, ge=1)
    cfg_scale: Finite = Field(1.0, ge=0, le=100)
    seed: Seed = 0
    temperature: Finite = Field(1.0, ge=0, le=100)
    top_k: int = Field(0, ge=0)
    top_p: Finite = Field(1.0, gt=0, le=1)
    text_temperature: Finite = Field(0.0, ge=0, le=100)
    stop: list[int] | None = Field(None, min_length=1)
    allowed: list[int] | None = Field(None, min_length=1)
