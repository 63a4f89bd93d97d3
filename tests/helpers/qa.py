"""Small QA data sets in each one's real Hugging Face schema (rows as the hub gives them), shared by the loader
and the QADataModule tests."""

from __future__ import annotations

import json


def triviaqa_rows(n: int = 4) -> list[dict]:
    # rc.nocontext: entity_pages and search_results are present but empty.
    return [
        {
            "question": f"Which city is capital number {i}?",
            "question_id": f"tc_{i}",
            "question_source": "http://www.quiz.example/",
            "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
            "search_results": {
                "description": [],
                "filename": [],
                "rank": [],
                "title": [],
                "url": [],
                "search_context": [],
            },
            "answer": {
                "aliases": [f"Paris {i}", f"City of Light {i}"],
                "normalized_aliases": [f"paris {i}", f"city of light {i}"],
                "matched_wiki_entity_name": "",
                "normalized_matched_wiki_entity_name": "",
                "normalized_value": f"paris {i}",
                "type": "WikipediaEntity",
                "value": f"Paris {i}",
            },
        }
        for i in range(n)
    ]


def truthfulqa_rows() -> list[dict]:
    return [
        {
            "type": "Adversarial",
            "category": "Misconceptions",
            "question": f"What happens if you eat watermelon seeds {i}?",
            "best_answer": "The seeds pass through your digestive system",
            "correct_answers": ["Nothing happens", "The seeds pass through your digestive system"],
            "incorrect_answers": ["You grow watermelons in your stomach", "You get sick"],
            "source": "https://wonderopolis.org/wonder/will-a-watermelon-grow-in-your-belly",
        }
        for i in range(3)
    ]


def coqa_rows() -> list[dict]:
    stories = [
        ("The cat runs to the river. Then the cat jumps.", ["Who runs?", "What did it do then?"], ["the cat", "jumps"]),
        ("A king lives in Paris. He likes music.", ["Where does the king live?", "What does he like?", "Who?"], []),
        ("The dog is red. It sleeps.", ["What color is the dog?"], ["red"]),
    ]
    rows = []
    for story, questions, answers in stories:
        answers = answers or ["in Paris", "music", "the king"]
        rows.append(
            {
                "source": "wikipedia",
                "story": story,
                "questions": questions,
                "answers": {
                    "input_text": answers,
                    "answer_start": [0] * len(answers),
                    "answer_end": [5] * len(answers),
                },
            }
        )
    return rows


def tydiqa_rows() -> list[dict]:
    return [
        {
            "id": f"{language}-{7432209516838383419 + i}-0",
            "title": "Paris",
            "context": "Paris is the capital of France.",
            "question": f"What is the capital of France {i}?",
            "answers": {"text": ["Paris", "Paris"], "answer_start": [0, 0]},
        }
        for i, language in enumerate(["english", "finnish", "swahili"])
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
