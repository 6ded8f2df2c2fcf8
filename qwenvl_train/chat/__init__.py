"""Talk to a trained model: `qwenvl-chat` (qwenvl_train/cli/chat.py).

prompt.py (messages -> ChatML / base-model prompt), stream.py (printing tokens as they
come, whole characters), session.py (a conversation: generate, map boxes to pixels, draw
them), batch.py (`--batch FILE.jsonl`), loading.py (`load_for_chat`: either export layout).
"""
