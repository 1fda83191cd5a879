"""Knowledge retrieval keeps Chinese text (issue 9 item 5): it used to keep
only [a-z0-9], so a Chinese question matched nothing."""

from __future__ import annotations

from actors.agent.bm25 import tokenize
from actors.agent.documents import KnowledgeEntry
from actors.agent.knowledge import KnowledgeBase


def test_chinese_is_tokenised_as_character_bigrams_and_english_as_words():
    assert tokenize("兵马俑在哪里") == ["兵马", "马俑", "俑在", "在哪", "哪里"]
    assert tokenize("the Rosetta Stone 罗塞塔石碑!") == ["rosetta", "stone", "罗塞", "塞塔", "塔石", "石碑"]
    assert tokenize("猫") == ["猫"]


def test_a_chinese_question_finds_the_chinese_entry():
    kb = KnowledgeBase([
        KnowledgeEntry(id="terracotta", title="兵马俑", text="兵马俑是秦始皇陵的陪葬坑，位于西安。"),
        KnowledgeEntry(id="rosetta", title="罗塞塔石碑", text="罗塞塔石碑刻于公元前196年，现藏于大英博物馆。"),
        KnowledgeEntry(id="mona", title="Mona Lisa", text="Leonardo painted the Mona Lisa."),
    ])
    assert kb.search("兵马俑在哪里？", k=1)[0][0].id == "terracotta"
    assert kb.search("罗塞塔石碑在哪个博物馆", k=1)[0][0].id == "rosetta"
    assert kb.search("Who painted the Mona Lisa?", k=1)[0][0].id == "mona"
