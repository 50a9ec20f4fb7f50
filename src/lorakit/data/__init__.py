"""Training data: JSONL records, chat-template tokenization with assistant-only labels, length-bucketed
batches, and the orders-to-JSON demo task."""
