r"""How a row becomes the prompt the model sees (SPEC 4.8): one owner for RL, SFT, `dlmkern eval`
and `dlmkern sample`.

* Chat template (the default when the tokenizer has one): the row's ``messages`` (or one user
  turn holding ``prompt``), an optional system prompt first, the instruction added to the last
  user turn, rendered with ``tokenizer.apply_chat_template(messages, add_generation_prompt=True,
  tokenize=False)`` and encoded with ``add_special_tokens=False``: the template already holds
  the special tokens, as TRL encodes templated prompts (trl GRPOTrainer: ``maybe_apply_chat_
  template`` then the processing class with ``add_special_tokens=False``).
* Raw (``chat_template: false``, or a tokenizer without a chat template such as dlmkern's
  character tokenizer): the system prompt and the user text joined by newlines, encoded as the
  tokenizer encodes by default.
* ``template``: a whole prompt string with ``{prompt}`` (the user text, instruction included),
  to reproduce a hand-written prompt format token for token; encoded without special tokens.

``instruction`` containing ``{prompt}`` is the user turn with the prompt put in its place;
otherwise it is appended to the prompt after a newline. The peers' math formats:

* TraceRL / TraDo and SDAR (Gen-Verse/dLLM-RL sample/trado_rl_rollout.py, sample/sdar_rl_rollout
  .py): ``<|im_start|>user\n{problem}\nPlease reason step by step, and put your final answer
  within \boxed{}.<|im_end|>\n<|im_start|>assistant\n`` = the Qwen-style chat template of one
  user turn with instruction ``Please reason step by step, and put your final answer within
  \boxed{}.``
* DiRL / SDAR (OpenMOSS/DiRL train/rollout_dapo_server.py ``reason_prompt``, eval/eval_lmdeploy
  .py; reasoning/test.py builds the same string with apply_chat_template): the same with
  ``$\boxed{}$``.
* TraceRL / LLaDA (Gen-Verse/dLLM-RL sample/llada_rl_rollout.py): ``<|startoftext|><|start_
  header_id|>user<|end_header_id|>You need to put your final answer in \boxed{}. This is the
  problem:\n{problem}<|eot_id|><|startoftext|><|start_header_id|>assistant<|end_header_id|>\n``,
  not LLaDA's own chat template (no blank line after the headers, a second <|startoftext|>):
  reproduced with ``template``.
* TraceRL / Dream (Gen-Verse/dLLM-RL sample/dream_rl_rollout.py): ``<|im_start|>system\nYou are
  a helpful assistant.<|im_end|>\n<|im_start|>user\nYou need to put your final answer in
  \boxed{}. This is the problem:\n{problem}<|im_end|>\n<|im_start|>assistant\n``: system prompt
  ``You are a helpful assistant.`` and instruction ``You need to put your final answer in
  \boxed{}. This is the problem:\n{prompt}`` (or ``template``).

dLLM-RL renders its strings with jinja2 ``Template(s)``, which drops the final newline after
``assistant``; its commit 2bc7ef0 ("Set keep_trailing_newline=True ...") restores it, as the chat
templates write it: the formats above keep it.
"""

from __future__ import annotations

from dataclasses import dataclass

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class PromptFormat:
    system_prompt: str = ""
    instruction: str = ""
    chat_template: bool | None = None    # None: when the tokenizer has one
    template: str = ""                   # a whole-prompt string with {prompt}

    def __post_init__(self):
        if self.template and "{prompt}" not in self.template:
            raise ValueError("prompt_template must contain {prompt} (where the user text goes)")
        if self.template and (self.system_prompt or self.chat_template):
            raise ValueError("prompt_template is the whole prompt: it cannot be combined with "
                             "system_prompt or chat_template: true")

    @classmethod
    def from_config(cls, cfg) -> PromptFormat:
        """From a trainer config's system_prompt / instruction / chat_template /
        prompt_template."""
        return cls(system_prompt=cfg.system_prompt, instruction=cfg.instruction,
                   chat_template=cfg.chat_template, template=cfg.prompt_template)

    # ---- the mode ------------------------------------------------------------------------------

    def uses_chat_template(self, tok) -> bool:
        if self.template or self.chat_template is False:
            return False
        has = bool(getattr(tok, "chat_template", None)) and hasattr(tok, "apply_chat_template")
        if self.chat_template and not has:
            raise ValueError("chat_template: true, but the tokenizer has no chat template")
        return has

    def check(self, rows: list[dict], tok, answer_key: str | None = None) -> None:
        """Every row can be rendered: conversations need the chat template (a raw or template
        prompt holds one user turn); a tokenizer that can refuse characters (dlmkern's character
        tokenizer) has every character of every prompt and answer (`answer_key`: SFT's), and
        the first row encodes. Before any model work."""
        from dlmkern.data.checks import check_characters

        if not self.uses_chat_template(tok):
            for i, r in enumerate(rows):
                self._single_turn(r, i)
        check_characters(rows, tok, self, answer_key)
        if rows:
            try:
                self.encode(rows[0], tok)
            except ValueError as e:  # e.g. characters the tokenizer lacks
                raise ValueError(f"row 0: its prompt in this format cannot be encoded: {e}") \
                    from None

    # ---- rendering -----------------------------------------------------------------------------

    def user_text(self, text: str) -> str:
        if not self.instruction:
            return text
        if "{prompt}" in self.instruction:
            return self.instruction.replace("{prompt}", text)
        return f"{text}\n{self.instruction}"

    def messages(self, row: dict) -> list[dict]:
        """The chat the template renders: system prompt (unless the row has one), the row's
        conversation (or one user turn), the instruction added to the last user turn."""
        msgs = [dict(m) for m in row.get("messages") or [{"role": "user",
                                                           "content": row["prompt"]}]]
        if self.system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        last = max((j for j, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last is not None:
            msgs[last]["content"] = self.user_text(msgs[last]["content"])
        return msgs

    def text(self, row: dict, tok) -> str:
        """The prompt text the model is given for this row."""
        if self.uses_chat_template(tok):
            return tok.apply_chat_template(self.messages(row), add_generation_prompt=True,
                                           tokenize=False)
        user = self.user_text(self._single_turn(row))
        if self.template:
            return self.template.replace("{prompt}", user)
        return f"{self.system_prompt}\n{user}" if self.system_prompt else user

    def encode(self, row: dict, tok) -> list[int]:
        """The prompt's token ids."""
        text = self.text(row, tok)
        if self.uses_chat_template(tok) or self.template:
            return encode_plain(tok, text)
        return list(tok.encode(text))

    def encode_answer(self, row: dict, answer: str, tok) -> list[int]:
        """SFT: the answer's token ids after this row's prompt. With the chat template, the
        assistant turn as the template writes it (the text the template adds after the
        generation prompt, end-of-turn tokens included), as TRL's prompt-completion SFT does."""
        if self.uses_chat_template(tok):
            prompt = self.text(row, tok)
            full = tok.apply_chat_template(
                self.messages(row) + [{"role": "assistant", "content": answer}], tokenize=False)
            if full.startswith(prompt):
                answer = full[len(prompt):]
        return encode_plain(tok, answer)

    def _single_turn(self, row: dict, i: int | None = None) -> str:
        msgs = row.get("messages")
        if msgs and (len(msgs) > 1 or msgs[0]["role"] != "user"):
            where = "a row" if i is None else f"row {i}"
            raise ValueError(f"{where} holds a conversation ({len(msgs)} messages, roles "
                             f"{[m['role'] for m in msgs]}) but prompts are not rendered with a "
                             "chat template (the tokenizer has none, chat_template: false, or "
                             "prompt_template is set); give a prompt column or a tokenizer "
                             "with a chat template")
        return msgs[0]["content"] if msgs else row["prompt"]


def encode_plain(tok, text: str) -> list[int]:
    """Token ids of text without the tokenizer's added special tokens (BOS / EOS): Hugging Face
    tokenizers take add_special_tokens=False; dlmkern's character tokenizer adds none."""
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:  # an encode(text) without the keyword adds nothing
        return list(tok.encode(text))
