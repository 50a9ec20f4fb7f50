"""Example tasks built on lorakit, outside the library: the demo's orders task and its data generator."""
