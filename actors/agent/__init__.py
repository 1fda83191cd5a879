"""The dialogue brain: personas, prompt building, memory, knowledge, tools, moderation."""
