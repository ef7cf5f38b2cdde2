"""The schemas of the structured-output checks (tests/py/structured_output.py, tests/py/instructor_client.py):
20 Pydantic models of different shapes (nested objects, arrays, enums, bounded numbers, optional fields,
unions), each bounded so that a random model, constrained, must finish its answer within `max_tokens`.
"""

from enum import Enum
from typing import Annotated, List, Literal, Optional, Union

from pydantic import BaseModel, Field


# Strings, arrays and numbers are bounded: the random model would otherwise write a string (or digits) until
# max_tokens, and an answer cut short is not valid. The bounds are part of what is checked.
class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Point(BaseModel):
    x: int = Field(ge=-9, le=9)
    y: int = Field(ge=-9, le=9)


class Name(BaseModel):
    name: str = Field(max_length=10)


class Age(BaseModel):
    age: int = Field(ge=0, le=120)


class Flag(BaseModel):
    ok: bool


class Paint(BaseModel):
    color: Color


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int = Field(ge=0, le=4)


class Tags(BaseModel):
    tags: List[Literal["a", "b", "c"]] = Field(max_length=3)


class Located(BaseModel):
    point: Point


class Path(BaseModel):
    points: List[Point] = Field(max_length=2)


class Nickname(BaseModel):
    nickname: Optional[str] = Field(max_length=6)


class Either(BaseModel):
    value: Union[Literal["none"], Point]


class Mixed(BaseModel):
    label: str = Field(max_length=5)
    count: int = Field(ge=1, le=3)
    on: bool


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=99)
    pets: List[Pet] = Field(max_length=2)


class Ratio(BaseModel):
    # A float's fraction has no end of its own (a model may write 1.000… until max_tokens): a step bounds it.
    ratio: float = Field(ge=0, le=1, multiple_of=0.25)


class Matrix(BaseModel):
    rows: List[Annotated[List[Literal[0, 1]], Field(max_length=3)]] = Field(max_length=2)


class Deep(BaseModel):
    a: Located
    b: Optional[Flag]


class Colors(BaseModel):
    colors: List[Color] = Field(min_length=1, max_length=3)


class Code(BaseModel):
    code: str = Field(pattern=r"^[A-Z]{3}-[0-9]{2}$")


class Vote(BaseModel):
    choice: Literal["yes", "no"]
    weight: int = Field(ge=1, le=5)
    comment: Optional[str] = Field(max_length=4)


class Reading(BaseModel):
    sensor: Literal["t1", "t2"]
    celsius: int = Field(ge=-40, le=60)
    ok: bool
    at: Point


MODELS = [Name, Age, Flag, Paint, Pet, Tags, Located, Path, Nickname, Either, Mixed, Person, Ratio, Matrix,
          Deep, Colors, Code, Vote, Reading, Point]
