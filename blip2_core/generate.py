"""Text generation: beam search and nucleus sampling over any model that can take one step at a time.

One decoding loop (`decode`) drives three step models:
- `QFormerCaptioner`: the Q-Former's own ITG decoder (stage-1 captioning). [DEC] is the BOS; the first call
  runs queries + [DEC] under the multimodal causal mask and caches every layer's keys/values, so later
  steps feed one new token and never touch the queries or the image again.
- `CausalLMStepper`: a decoder LLM (OPT) after the soft visual prompt: [queries | BOS prompt] then tokens.
- `Seq2SeqStepper`: an encoder-decoder LLM (FlanT5): [queries | prompt] encoded once, the decoder steps.
Each stepper has a no-cache mode that recomputes the whole prefix every step; the two modes must give
identical tokens (tested).

Beam search keeps `num_beams` hypotheses; a finished one scores sum(log p) / length ** length_penalty
(length = generated tokens, EOS included), so a negative penalty favours short answers (VQA uses -1).
Decoding stops once no running beam can still beat the worst kept hypothesis, which makes the result
exact, not heuristic.
"""

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from blip2_core.llm_bridge import LLMBridge, pad_right
from blip2_core.qformer import QFormer

VQA_PROMPTS = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}


def vqa_prompt(llm_kind: str, question: str) -> str:
    """The zero-shot VQA prompt of the paper for an LLM family ("opt" or "t5")."""
    if llm_kind not in VQA_PROMPTS:
        raise ValueError(f"llm_kind: {llm_kind!r} has no VQA prompt; expected one of {sorted(VQA_PROMPTS)}")
    return VQA_PROMPTS[llm_kind].format(question)


@dataclass(frozen=True)
class GenerationConfig:
    num_beams: int = 1
    do_sample: bool = False
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    max_new_tokens: int = 30
    num_return_sequences: int = 1
    use_cache: bool = True
    seed: int | None = None  # sampling generator seed

    def __post_init__(self) -> None:
        if self.do_sample and self.num_beams > 1:
            raise ValueError("num_beams: sampling is only supported with num_beams=1")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError("num_return_sequences: must be <= num_beams for beam search")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < max(1, self.min_new_tokens):
            raise ValueError("max_new_tokens: must be >= max(1, min_new_tokens)")


VQA_GENERATION = GenerationConfig(num_beams=5, length_penalty=-1.0, max_new_tokens=10)  # SPEC.md
CAPTION_GENERATION = GenerationConfig(num_beams=5, max_new_tokens=30, min_new_tokens=8)


class StepModel(Protocol):
    """A model that decodes one token at a time. Rows (N) are batch x beams/samples."""

    def first(self) -> tuple[torch.Tensor, Any]:
        """Run the prompt; (N0, V) logits of the first new token, and the state."""

    def next(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Append tokens (N, 1); (N, V) logits of the following token, and the new state."""

    def select(self, state: Any, index: torch.Tensor) -> Any:
        """Reorder or replicate rows of the state: row i becomes old row index[i]."""


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B * R, T) generated tokens only, right-padded with pad_token_id
    scores: torch.Tensor  # (B * R,) beam score, or sum of log-probabilities when sampling
    lengths: torch.Tensor  # (B * R,) generated tokens per row, EOS included


# ---------------------------------------------------------------------------------------------------------
# Logit processing


def process_logits(logits: torch.Tensor, seen: torch.Tensor, step: int, eos_id: int, cfg: GenerationConfig):
    """(N, V) raw logits -> (N, V) log-probabilities after repetition penalty, min-length and temperature."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:  # CTRL penalty on tokens already in the sequence
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if step < cfg.min_new_tokens:
        logits[:, eos_id] = float("-inf")
    if cfg.do_sample and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    return F.log_softmax(logits, dim=-1)


def top_p_filter(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always at least the best one)."""
    if top_p >= 1.0:
        return log_probs
    sorted_lp, order = log_probs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()  # mass of strictly better tokens
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return log_probs.masked_fill(drop, float("-inf"))


# ---------------------------------------------------------------------------------------------------------
# The decoding loop


def decode(
    model: StepModel,
    batch_size: int,
    cfg: GenerationConfig,
    eos_token_id: int,
    pad_token_id: int,
    vocab_size: int,
    prompt_ids: torch.Tensor | None = None,
) -> GenerationOutput:
    """Generate for `batch_size` inputs; prompt_ids (B, P) (pad = -1) count as seen for the penalty."""
    if cfg.num_beams > 1:
        return beam_search(model, batch_size, cfg, eos_token_id, pad_token_id, vocab_size, prompt_ids)
    return sample_or_greedy(model, batch_size, cfg, eos_token_id, pad_token_id, vocab_size, prompt_ids)


def seen_matrix(prompt_ids: torch.Tensor | None, rows: int, vocab_size: int, device) -> torch.Tensor:
    seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
    if prompt_ids is not None:
        ids = prompt_ids.to(device)
        seen.scatter_(1, ids.clamp(min=0), ids >= 0)
    return seen


def sample_or_greedy(model, batch_size, cfg, eos_id, pad_id, vocab_size, prompt_ids) -> GenerationOutput:
    repeats = cfg.num_return_sequences
    logits, state = model.first()
    index = torch.arange(batch_size, device=logits.device).repeat_interleave(repeats)
    logits, state = logits[index], model.select(state, index)
    rows = batch_size * repeats
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(cfg.seed)
    seen = seen_matrix(None if prompt_ids is None else prompt_ids[index], rows, vocab_size, logits.device)
    tokens = torch.full((rows, cfg.max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    scores = torch.zeros(rows, device=logits.device)
    lengths = torch.zeros(rows, dtype=torch.long, device=logits.device)
    running = torch.ones(rows, dtype=torch.bool, device=logits.device)
    for step in range(cfg.max_new_tokens):
        log_probs = process_logits(logits, seen, step, eos_id, cfg)
        if cfg.do_sample:
            probs = top_p_filter(log_probs, cfg.top_p).exp()
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = log_probs.argmax(dim=-1)
        token = torch.where(running, token, pad_id)
        tokens[:, step] = token
        scores += torch.where(running, log_probs.gather(1, token[:, None]).squeeze(1), 0.0)
        lengths += running.long()
        seen[torch.arange(rows), token] |= running
        running &= token != eos_id
        if not running.any() or step + 1 == cfg.max_new_tokens:
            break
        logits, state = model.next(token[:, None], state)
    return GenerationOutput(tokens[:, : int(lengths.max())], scores, lengths)


@dataclass
class Hypotheses:
    """Finished hypotheses of one input: the best `size` by length-penalised score."""

    size: int
    length_penalty: float
    items: list[tuple[float, list[int]]] = field(default_factory=list)

    def score(self, sum_log_prob: float, length: int) -> float:
        return sum_log_prob / (length**self.length_penalty)

    def add(self, sum_log_prob: float, tokens: list[int]) -> None:
        self.items.append((self.score(sum_log_prob, len(tokens)), tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.size :]

    def is_done(self, best_running_sum: float, length: int, max_length: int) -> bool:
        """True when no running beam can still enter: its sum only falls, its length only grows."""
        if len(self.items) < self.size:
            return False
        bound_length = max_length if self.length_penalty > 0 else length + 1
        return self.items[-1][0] >= self.score(best_running_sum, bound_length)


def beam_search(model, batch_size, cfg, eos_id, pad_id, vocab_size, prompt_ids) -> GenerationOutput:
    beams = cfg.num_beams
    logits, state = model.first()
    device = logits.device
    index = torch.arange(batch_size, device=device).repeat_interleave(beams)
    logits, state = logits[index], model.select(state, index)
    seen = seen_matrix(
        None if prompt_ids is None else prompt_ids[index], batch_size * beams, vocab_size, device
    )
    # Only the first beam of each input is live at step 0, so the K copies don't produce K equal beams.
    beam_scores = torch.full((batch_size, beams), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    beam_tokens = torch.zeros(batch_size * beams, 0, dtype=torch.long, device=device)
    finished = [Hypotheses(beams, cfg.length_penalty) for _ in range(batch_size)]
    done = [False] * batch_size
    for step in range(cfg.max_new_tokens):
        log_probs = process_logits(logits, seen, step, eos_id, cfg)  # (B * K, V)
        candidates = (beam_scores.view(-1, 1) + log_probs).view(batch_size, beams * vocab_size)
        top_scores, top_ids = candidates.topk(2 * beams, dim=1)  # (B, 2K): enough to refill K after EOS
        next_scores, next_tokens, next_rows = [], [], []
        for b in range(batch_size):
            picked = _advance_one(
                b, top_scores[b], top_ids[b], beam_tokens, finished[b], done[b], eos_id, beams, vocab_size
            )
            next_scores += [s for s, _, _ in picked]
            next_tokens += [t for _, t, _ in picked]
            next_rows += [b * beams + r for _, _, r in picked]
            best_running = max(s for s, _, _ in picked)
            if step + 1 < cfg.max_new_tokens:  # at the limit, running beams are scored as they stand
                done[b] = done[b] or finished[b].is_done(best_running, step + 1, cfg.max_new_tokens)
        rows = torch.tensor(next_rows, device=device)
        token = torch.tensor(next_tokens, device=device)
        beam_scores = torch.tensor(next_scores, device=device).view(batch_size, beams)
        beam_tokens = torch.cat([beam_tokens[rows], token[:, None]], dim=1)
        seen = seen[rows]
        seen[torch.arange(len(rows)), token] = True
        if all(done) or step + 1 == cfg.max_new_tokens:
            break
        logits, state = model.next(token[:, None], model.select(state, rows))
    for b in range(batch_size):  # beams still running at the length limit compete as they are
        for k in range(beams):
            if not done[b] and beam_scores[b, k] > float("-inf"):
                finished[b].add(beam_scores[b, k].item(), beam_tokens[b * beams + k].tolist())
    return _collect(finished, cfg.num_return_sequences, pad_id, device)


def _advance_one(b, top_scores, top_ids, beam_tokens, hyps, is_done, eos_id, beams, vocab_size) -> list:
    """Next K (score, token, beam) for input b; candidates ending in EOS go to the finished hypotheses."""
    if is_done:  # keep the row shape; these beams are ignored from now on
        return [(float("-inf"), eos_id, 0)] * beams
    picked = []
    for score, flat in zip(top_scores.tolist(), top_ids.tolist(), strict=True):
        beam, token = divmod(flat, vocab_size)
        if score == float("-inf"):
            break
        if token == eos_id:
            hyps.add(score, beam_tokens[b * beams + beam].tolist() + [token])
        else:
            picked.append((score, token, beam))
        if len(picked) == beams:
            return picked
    while len(picked) < beams:  # fewer live candidates than beams (tiny vocabularies, min length)
        picked.append((float("-inf"), eos_id, 0))
    return picked


def _collect(finished: list[Hypotheses], per_input: int, pad_id: int, device) -> GenerationOutput:
    rows, scores = [], []
    for hyps in finished:
        for score, tokens in hyps.items[:per_input]:
            rows.append(tokens)
            scores.append(score)
    sequences, mask = pad_right(rows, pad_id)
    return GenerationOutput(sequences.to(device), torch.tensor(scores, device=device), mask.sum(1).to(device))


# ---------------------------------------------------------------------------------------------------------
# Step models


class QFormerCaptioner:
    """Stage-1 captioning with the Q-Former's ITG decoder, conditioned on image features (B, N, C)."""

    def __init__(self, qformer: QFormer, image_embeds: torch.Tensor, bos_ids: torch.Tensor, use_cache: bool):
        self.qformer, self.image, self.use_cache = qformer, image_embeds, use_cache
        self.bos_ids = bos_ids  # (B, P): [DEC] and optional prompt tokens

    def _full(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        out = self.qformer(
            input_ids=text,
            query_embeds=self.qformer.expand_queries(text.shape[0]),
            encoder_hidden_states=image,
            mask_kind="causal",
            use_cache=self.use_cache,
        )
        return out

    def first(self):
        out = self._full(self.image, self.bos_ids)
        logits = self.qformer.lm_logits(out.last_hidden_state[:, -1:])[:, 0]  # (B, V)
        return logits, {"text": self.bos_ids, "image": self.image, "cache": out.past_key_values}

    def next(self, tokens, state):
        text = torch.cat([state["text"], tokens], dim=1)
        if self.use_cache:  # only the new token: queries and image live in the cache
            mask = torch.ones_like(text)
            out = self.qformer(
                input_ids=tokens,
                attention_mask=mask,
                mask_kind="causal",
                past_key_values=state["cache"],
                use_cache=True,
            )
        else:
            out = self._full(state["image"], text)
        logits = self.qformer.lm_logits(out.last_hidden_state[:, -1:])[:, 0]
        return logits, {"text": text, "image": state["image"], "cache": out.past_key_values}

    def select(self, state, index):
        cache = state["cache"].select(index) if state["cache"] is not None else None
        return {"text": state["text"][index], "image": state["image"][index], "cache": cache}


@torch.no_grad()
def generate_captions_qformer(
    qformer: QFormer,
    image_embeds: torch.Tensor,
    dec_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    cfg: GenerationConfig = CAPTION_GENERATION,
    prompt_ids: list[int] | None = None,
) -> GenerationOutput:
    """Captions from the Q-Former alone. image_embeds (B, N, C) = ln_vision(frozen ViT features)."""
    batch = image_embeds.shape[0]
    bos = torch.tensor([[dec_token_id] + list(prompt_ids or [])], device=image_embeds.device).expand(
        batch, -1
    )
    stepper = QFormerCaptioner(qformer, image_embeds, bos, cfg.use_cache)
    vocab = qformer.embeddings.word_embeddings.num_embeddings
    return decode(stepper, batch, cfg, eos_token_id, pad_token_id, vocab, prompt_ids=bos)


class CausalLMStepper:
    """A decoder LLM after the visual prompt: embeds (N, L, D) with mask (N, L), then generated tokens."""

    def __init__(self, llm, embeds: torch.Tensor, mask: torch.Tensor, use_cache: bool):
        self.llm, self.embeds, self.mask, self.use_cache = llm, embeds, mask, use_cache

    def first(self):
        out = self.llm(inputs_embeds=self.embeds, attention_mask=self.mask, use_cache=self.use_cache)
        state = {"embeds": self.embeds, "mask": self.mask, "tokens": self.mask.new_zeros(len(self.mask), 0)}
        return out.logits[:, -1], {**state, "cache": out.past_key_values if self.use_cache else None}

    def next(self, tokens, state):
        mask = torch.cat([state["mask"], torch.ones_like(tokens)], dim=1)
        generated = torch.cat([state["tokens"], tokens], dim=1)
        if self.use_cache:
            out = self.llm(input_ids=tokens, attention_mask=mask, cache=state["cache"], use_cache=True)
        else:
            new_embeds = self.llm.get_input_embeddings()(generated)
            out = self.llm(inputs_embeds=torch.cat([state["embeds"], new_embeds], dim=1), attention_mask=mask)
        cache = out.past_key_values if self.use_cache else None
        return out.logits[:, -1], {
            "embeds": state["embeds"],
            "mask": mask,
            "tokens": generated,
            "cache": cache,
        }

    def select(self, state, index):
        if state["cache"] is not None:
            state["cache"].reorder_cache(index)  # index_select on every layer; repeats replicate rows
        return {k: (v[index] if torch.is_tensor(v) else v) for k, v in state.items()}


class Seq2SeqStepper:
    """An encoder-decoder LLM: [visual prompt | prompt] encoded once, then the decoder steps."""

    def __init__(self, llm, embeds: torch.Tensor, mask: torch.Tensor, use_cache: bool):
        self.llm, self.embeds, self.mask, self.use_cache = llm, embeds, mask, use_cache

    def first(self):
        encoded = self.llm.get_encoder()(
            inputs_embeds=self.embeds, attention_mask=self.mask
        ).last_hidden_state
        start = torch.full((len(encoded), 1), self.llm.config.decoder_start_token_id, device=encoded.device)
        state = {"encoded": encoded, "mask": self.mask, "tokens": start, "cache": None}
        return self._run(start, state)

    def _run(self, decoder_ids, state):
        out = self.llm(
            encoder_outputs=(state["encoded"],),
            attention_mask=state["mask"],
            decoder_input_ids=decoder_ids,
            cache=state["cache"],
            use_cache=self.use_cache,
        )
        return out.logits[:, -1], {**state, "cache": out.past_key_values if self.use_cache else None}

    def next(self, tokens, state):
        state = {**state, "tokens": torch.cat([state["tokens"], tokens], dim=1)}
        if self.use_cache:
            return self._run(tokens, state)
        return self._run(state["tokens"], state)

    def select(self, state, index):
        if state["cache"] is not None:
            state["cache"].reorder_cache(index)
        return {k: (v[index] if torch.is_tensor(v) else v) for k, v in state.items()}


def left_pad(rows: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask (B, T): every row's last position is a real token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def generate_with_llm(
    bridge: LLMBridge,
    query_output: torch.Tensor,
    prompts: list[str] | None = None,
    cfg: GenerationConfig = CAPTION_GENERATION,
) -> tuple[list[str], GenerationOutput]:
    """Instructed generation: the prompt text follows the visual prompt. query_output (B, Q, H)."""
    batch = query_output.shape[0]
    prompts = prompts or [""] * batch
    tok = bridge.tokenizer
    rows = [tok(p).input_ids for p in prompts]  # OPT: BOS + prompt; T5: prompt + EOS
    ids, text_mask = left_pad(rows, tok.pad_token_id)
    device = query_output.device
    visual_prompt = bridge.project(query_output)
    embeds, mask = bridge.embed_with_queries(visual_prompt, ids.to(device), text_mask.to(device))
    stepper_cls = Seq2SeqStepper if bridge.is_encoder_decoder else CausalLMStepper
    stepper = stepper_cls(bridge.llm, embeds, mask, cfg.use_cache)
    seen_ids = ids.masked_fill(text_mask == 0, -1)  # prompt tokens count for the repetition penalty
    vocab = bridge.llm.get_output_embeddings().out_features
    out = decode(stepper, batch, cfg, bridge.eos_token_id, tok.pad_token_id, vocab, prompt_ids=seen_ids)
    texts = [
        tok.decode(row[:n], skip_special_tokens=True).strip()
        for row, n in zip(out.sequences, out.lengths, strict=True)
    ]
    return texts, out
