"""Agent sessions: exact token-in/token-out trajectories behind the OpenAI chat API (pure logic).

- `messages`  message-level matching (None/""/[] equal, tool-call arguments as JSON objects);
- `tree`      one session's turns as a tree: attach point, branches, limits;
- (the junction: `Tokenizer.render_appended`, used by router/stages/chat_template.py)
- `samples`   training samples from the tree's kept leaves;
- `registry`  the live sessions: ids, deletion (410), idle expiry, limits, the shared prompt cache.
"""
