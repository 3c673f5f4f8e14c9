"""A prompt set the project builds itself (no data set can be downloaded): instruction templates crossed
with topics. Training and held-out prompts never share a topic, so held-out acceptance is not inflated
by answers the SSM has seen."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SpecInferError

TEMPLATES = [
    "Explain {topic} to a beginner.",
    "What are the three most important facts about {topic}?",
    "Write a short paragraph about {topic}.",
    "Give me a step-by-step guide related to {topic}.",
    "What are common misconceptions about {topic}?",
    "Summarize the history of {topic} in a few sentences.",
    "Write a haiku about {topic}.",
    "List five questions a student might ask about {topic}.",
    "How would you teach {topic} to a child?",
    "What are the pros and cons of {topic}?",
    "Write a short story that involves {topic}.",
    "Compare {topic} with something similar and explain the difference.",
    "Give practical advice about {topic}.",
    "Why does {topic} matter in everyday life?",
    "Describe {topic} in exactly three sentences.",
    "Write an email to a friend about {topic}.",
]

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "machine learning",
    "healthy breakfast", "learning a second language", "volcanoes", "the stock market", "recycling",
    "the human heart", "electric cars", "gardening", "the Roman Empire", "sleep", "coffee", "chess",
    "climate change", "the internet", "bicycles", "honey bees", "public speaking", "the moon",
    "budgeting", "earthquakes", "jazz music", "the immune system", "solar panels", "time management",
    "dinosaurs", "baking bread", "the Olympic Games", "oceans", "friendship", "vaccines", "rainforests",
    "programming in Python", "the printing press", "meditation", "trains", "mountains", "libraries",
    "the periodic table", "democracy", "running a marathon", "cats", "dogs", "the solar system",
    "writing a resume", "renewable energy", "ancient Egypt", "smartphones", "cooking pasta",
    "the human brain", "rain", "board games", "museums", "the Great Wall of China", "tea", "snow",
    "first aid", "bridges", "photography", "the desert", "penguins", "credit cards", "airplanes",
    "painting", "volunteering", "electricity", "fungi", "the violin", "hiking", "robots", "soap",
    "maps", "the alphabet", "glaciers", "kindness", "the calendar",
]


def build_prompts(held_out_every: int = 5) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts); every `held_out_every`-th topic is held out whole."""
    train, held_out = [], []
    for i, topic in enumerate(TOPICS):
        target = held_out if i % held_out_every == 0 else train
        target.extend(template.format(topic=topic) for template in TEMPLATES)
    return train, held_out


def read_prompt_file(path: str) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts) from a JSON list of strings: every 5th is held out."""
    try:
        prompts = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SpecInferError(f"cannot read prompt file {path!r}: {err}") from None
    if not isinstance(prompts, list) or len(prompts) < 2 or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise SpecInferError(f"prompt file {path!r} must hold a JSON list of at least two non-empty strings")
    held_out = prompts[::5]
    return [p for i, p in enumerate(prompts) if i % 5], held_out
