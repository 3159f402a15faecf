"""Prompt rewriting: turn a user's few words into the dense description the video model was trained on."""
