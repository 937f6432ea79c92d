"""Visibility labels: one small integer rule that expresses every attention mask of the field.

Every query row i carries two int32 labels ``(q_order[i], q_group[i])`` and every key row j carries
``(k_order[j], k_group[j])``. Key j is visible to query i iff::

    k_order[j] < q_order[i]   or   k_group[j] == q_group[i]

("strictly earlier in the order, or in the same group"). Labels are plain ``[B, L]`` int32 tensors
whose batch may be 1 (broadcast); changing them costs nothing, so a mask that changes every denoising
step needs no mask building and no recompilation.

Packed sequences add optional document labels ``q_doc`` / ``k_doc``: key j is visible to query i
iff ``q_doc[i] == k_doc[j]`` **and** the rule above holds, so every mask family works inside each
document of a packed row (``Mask.within_documents``, or ``documents=`` in the constructors).

This module imports only torch: it is shared by the kernels' Python layer and the pure-PyTorch
reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._mask_args import (_ALWAYS_FIT_INT32, _NEED_RANGE_CHECK, INT32_MAX, INT32_MIN, DeviceLike, _block_size,
                         _check_bool, _combined_documents, _common_batch, _default_device, _prefix_len, _seq_len,
                         _to_int32_labels)

__all__ = ["Mask", "document_positions", "INT32_MAX", "INT32_MIN"]


def document_positions(documents: Optional[torch.Tensor], seq_len: int,
                       device: DeviceLike = None) -> tuple:
    """``(doc, pos)``: the document index and the position within it of every token of packed rows.

    ``documents``: integer ``[B, seq_len]`` or ``[seq_len]`` ids; every maximal run of equal ids is
    one document (ids may repeat in other runs: those are other documents; :meth:`Mask.within_documents`,
    by contrast, treats equal ids as one document wherever they are). ``doc`` int32 counts the runs
    from 0; ``pos`` int32 restarts at 0 at each run; both on ``device`` (default: the ids').
    ``documents=None``: ``(None, positions 0 .. seq_len - 1)`` as a ``[1, seq_len]`` row. Int32 ids
    are read nothing of on the host (int64 ids are range-checked, one host read).

    Example (documents of lengths 3, 2, 2; ``torch.repeat_interleave`` turns lengths into ids)::

        >>> ids = torch.repeat_interleave(torch.arange(3), torch.tensor([3, 2, 2]))
        >>> doc, pos = document_positions(ids, 7)
        >>> doc.tolist(), pos.tolist()
        ([[0, 0, 0, 1, 1, 2, 2]], [[0, 1, 2, 0, 1, 0, 1]])
    """
    if documents is None:
        return None, torch.arange(seq_len, dtype=torch.int32, device=_default_device(device))[None]
    ids = _to_int32_labels("documents", documents)
    if ids.shape[1] != seq_len:
        raise ValueError(f"Mask: documents must have length {seq_len}, got shape {list(documents.shape)}")
    if device is not None:
        ids = ids.to(device)
    index = torch.arange(seq_len, dtype=torch.int32, device=ids.device)[None]
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    doc = starts.to(torch.int32).cumsum(1, dtype=torch.int32) - 1
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
    return doc, (index - first).to(torch.int32)


class Mask:
    """Query and key visibility labels; key j is visible to query i iff
    ``k_order[j] < q_order[i] or k_group[j] == q_group[i]`` (and, with document labels, only if
    ``q_doc[i] == k_doc[j]``).

    Attributes ``q_order``, ``q_group`` (int32 ``[Bq, Lq]``) and ``k_order``, ``k_group`` (int32
    ``[Bk, Lk]``) are plain tensors; each batch is 1 (broadcast) or the common batch ``B``. Labels
    given as int32 2-D tensors are stored without a copy; other integer dtypes are converted (int64
    values are range-checked, which reads them on the host), 1-D labels become ``[1, L]`` views.
    ``q_doc`` (``[Bq, Lq]``) and ``k_doc`` (``[Bk, Lk]``) are None, or both given (packed
    sequences: see :meth:`within_documents`).

    Example:
        >>> import torch
        >>> pos = torch.arange(3, dtype=torch.int32)
        >>> m = Mask(pos, pos, pos, pos)            # causal, written by hand
        >>> m.to_dense()[0].int()
        tensor([[1, 0, 0],
                [1, 1, 0],
                [1, 1, 1]], dtype=torch.int32)
        >>> (m.batch, m.q_len, m.k_len)
        (1, 3, 3)
    """

    def __init__(
        self,
        q_order: torch.Tensor,
        q_group: torch.Tensor,
        k_order: torch.Tensor,
        k_group: torch.Tensor,
        q_doc: Optional[torch.Tensor] = None,
        k_doc: Optional[torch.Tensor] = None,
    ) -> None:
        labels = {
            "q_order": _to_int32_labels("q_order", q_order),
            "q_group": _to_int32_labels("q_group", q_group),
            "k_order": _to_int32_labels("k_order", k_order),
            "k_group": _to_int32_labels("k_group", k_group),
        }
        if (q_doc is None) != (k_doc is None):
            raise ValueError(f"Mask: give both q_doc and k_doc or neither, got q_doc "
                             f"{'None' if q_doc is None else 'a tensor'} and k_doc {'None' if k_doc is None else 'a tensor'}")
        if q_doc is not None:
            labels["q_doc"] = _to_int32_labels("q_doc", q_doc)
            labels["k_doc"] = _to_int32_labels("k_doc", k_doc)
        for side in ("q", "k"):
            order = labels[f"{side}_order"]
            for kind in ("group", "doc"):
                other = labels.get(f"{side}_{kind}")
                if other is not None and other.shape[1] != order.shape[1]:
                    raise ValueError(
                        f"Mask: {side}_order and {side}_{kind} must have the same length, got shapes "
                        f"{list(order.shape)} and {list(other.shape)}"
                    )
        batches = {name: t.shape[0] for name, t in labels.items()}
        if _common_batch(batches) is None:
            raise ValueError(f"Mask: label batches must each be 1 or a common B, got {batches}")
        devices = {t.device for t in labels.values()}
        if len(devices) != 1:
            got = {name: str(t.device) for name, t in labels.items()}
            raise TypeError(f"Mask: all labels must be on the same device, got {got}")

        self.q_order = labels["q_order"]
        self.q_group = labels["q_group"]
        self.k_order = labels["k_order"]
        self.k_group = labels["k_group"]
        self.q_doc: Optional[torch.Tensor] = labels.get("q_doc")
        self.k_doc: Optional[torch.Tensor] = labels.get("k_doc")
        self._family: Optional[str] = None  # set by the family constructors, shown by __repr__

    # ----------------------------------------------------------------------------------- properties
    @property
    def batch(self) -> int:
        """The batch the labels broadcast to (1 if every label tensor has batch 1)."""
        return max(t.shape[0] for t in self.labels() if t is not None)

    @property
    def has_documents(self) -> bool:
        """Whether the mask carries document labels (packed sequences)."""
        return self.q_doc is not None

    def labels(self) -> tuple:
        """``(q_order, q_group, k_order, k_group, q_doc, k_doc)``; the last two may be None."""
        return self.q_order, self.q_group, self.k_order, self.k_group, self.q_doc, self.k_doc

    @property
    def q_len(self) -> int:
        """Number of query rows (Lq)."""
        return self.q_order.shape[1]

    @property
    def k_len(self) -> int:
        """Number of key rows (Lk)."""
        return self.k_order.shape[1]

    @property
    def device(self) -> torch.device:
        """Device of the label tensors."""
        return self.q_order.device

    # ------------------------------------------------------------------------------------- methods
    def to(self, device: DeviceLike) -> "Mask":
        """Return a new Mask with the labels on ``device``.

        Example:
            >>> Mask.causal(4).to("cpu").device
            device(type='cpu')
        """
        moved = Mask(*(None if t is None else t.to(device) for t in self.labels()))
        moved._family = self._family
        return moved

    def to_dense(self) -> torch.Tensor:
        """The visibility matrix, bool ``[B, Lq, Lk]`` (True = visible); for tests and debugging.

        Example:
            >>> Mask.block_diagonal(4, 2).to_dense()[0].int()
            tensor([[1, 1, 0, 0],
                    [1, 1, 0, 0],
                    [0, 0, 1, 1],
                    [0, 0, 1, 1]], dtype=torch.int32)
        """
        earlier = self.k_order[:, None, :] < self.q_order[:, :, None]
        same_group = self.k_group[:, None, :] == self.q_group[:, :, None]
        visible = earlier | same_group
        if self.has_documents:
            visible = visible & (self.k_doc[:, None, :] == self.q_doc[:, :, None])
        return visible

    def within_documents(self, q_doc: torch.Tensor, k_doc: Optional[torch.Tensor] = None) -> "Mask":
        """This mask restricted to packed documents: key j stays visible to query i only if
        ``q_doc[i] == k_doc[j]`` (int ``[B, Lq]`` / ``[B, Lk]`` or ``[L]``, any ids). ``k_doc``
        defaults to ``q_doc`` when Lq == Lk. A mask that has document labels already keeps both
        conditions (the new ids must match too, as a pair with the old ones).

        Equal ids are one document wherever they occur (the constructors' ``documents=`` instead
        makes each run of equal ids its own document). The CPU kernel skips every tile whose query
        and key document ranges do not meet; a tile that straddles a document boundary is computed
        with the per-element test (on CUDA, calls with documents run the reference until the planned
        CUDA family, which reads them, has run on a GPU; DLMFUSE_CUDA_KERNELS=1 opts into it).
        Labels that depend on positions (block ids) must restart at each document: the
        constructors do that when given ``documents=``. Combining with existing document labels
        ranks the id pairs with ``torch.unique`` (a host sync on CUDA).

        Example (two documents of 3 and 2 tokens, causal inside each)::

            >>> doc = torch.tensor([0, 0, 0, 1, 1])
            >>> Mask.causal(5).within_documents(doc).to_dense()[0].int()
            tensor([[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0],
                    [0, 0, 0, 1, 0],
                    [0, 0, 0, 1, 1]], dtype=torch.int32)
        """
        if k_doc is None:
            if self.q_len != self.k_len:
                raise ValueError(f"within_documents: k_doc is needed when Lq ({self.q_len}) != Lk ({self.k_len})")
            k_doc = q_doc
        q_doc = _to_int32_labels("q_doc", q_doc)
        k_doc = _to_int32_labels("k_doc", k_doc)
        for name, doc, length in (("q_doc", q_doc, self.q_len), ("k_doc", k_doc, self.k_len)):
            if doc.shape[1] != length:
                raise ValueError(f"within_documents: {name} must have length {length}, got shape {list(doc.shape)}")
        if self.has_documents:  # both conditions: documents are the pairs (old id, new id)
            q_doc, k_doc = _combined_documents(self.q_doc, q_doc, self.k_doc, k_doc)
        mask = Mask(self.q_order, self.q_group, self.k_order, self.k_group, q_doc, k_doc)
        mask._family = None if self._family is None else f"{self._family}, within documents"
        return mask

    def gather_queries(self, index: torch.Tensor) -> "Mask":
        """Keep only the query rows ``index`` (sparse queries); key labels are unchanged.

        ``index`` is an integer tensor ``[B, n]`` or ``[n]`` of query positions in ``[0, q_len)``
        (repeats allowed). Label batch 1 and index batch B broadcast. The range check reads the
        index on the host.

        Example:
            >>> m = Mask.causal(5).gather_queries(torch.tensor([[4, 1]]))
            >>> m.q_order
            tensor([[4, 1]], dtype=torch.int32)
            >>> m.to_dense()[0].int()
            tensor([[1, 1, 1, 1, 1],
                    [1, 1, 0, 0, 0]], dtype=torch.int32)
        """
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"gather_queries: index must be a torch.Tensor, got {type(index).__name__}")
        if index.dtype not in _ALWAYS_FIT_INT32 and index.dtype not in _NEED_RANGE_CHECK:
            raise TypeError(f"gather_queries: index must have an integer dtype, got {index.dtype}")
        if index.dim() not in (1, 2):
            raise ValueError(f"gather_queries: index must have shape [n] or [B, n], got {list(index.shape)}")
        if index.device != self.device:
            raise TypeError(f"gather_queries: index is on {index.device} but the mask is on {self.device}")
        unsigned64 = index.dtype == torch.uint64
        if unsigned64:  # few kernels exist for uint64; reinterpret, range-check below
            index = index.view(torch.int64)
        index = index.to(torch.int64)
        if index.dim() == 1:
            index = index.unsqueeze(0)
        if index.numel() > 0:
            outside = (index < 0) | (index >= self.q_len)
            if bool(outside.any()):
                bad = int(index[outside][0])
                if unsigned64 and bad < 0:
                    bad += 1 << 64  # the uint64 value the caller passed
                raise ValueError(f"gather_queries: index value {bad} is outside [0, q_len={self.q_len})")

        q_batch = max(t.shape[0] for t in (self.q_order, self.q_group, self.q_doc) if t is not None)
        batch = _common_batch({"labels": q_batch, "index": index.shape[0]})
        if batch is None:
            raise ValueError(
                f"gather_queries: index batch {index.shape[0]} does not match the query label "
                f"batch {q_batch} (each must be 1 or a common B)"
            )
        rows = index.expand(batch, -1)
        q_order, q_group, q_doc = (None if t is None else torch.gather(t.expand(batch, -1), 1, rows)
                                   for t in (self.q_order, self.q_group, self.q_doc))
        gathered = Mask(q_order, q_group, self.k_order, self.k_group, q_doc, self.k_doc)
        gathered._family = None if self._family is None else f"{self._family}, gathered"
        return gathered

    def __repr__(self) -> str:
        family = "" if self._family is None else f"{self._family}, "
        if self.has_documents and "documents" not in family:
            family += "documents, "
        return (f"Mask({family}q=[{self.q_order.shape[0]}, {self.q_len}], "
                f"k=[{self.k_order.shape[0]}, {self.k_len}], device={self.device})")

    # --------------------------------------------------------------------------------- constructors
    @classmethod
    def _family_of(cls, family: str, q_order, q_group, k_order, k_group, q_doc=None, k_doc=None) -> "Mask":
        mask = cls(q_order, q_group, k_order, k_group, q_doc, k_doc)
        mask._family = family if q_doc is None else f"{family}, documents"
        return mask

    @classmethod
    def _same_qk(cls, family: str, order: torch.Tensor, group: torch.Tensor, doc: Optional[torch.Tensor] = None) -> "Mask":
        """A mask whose query and key labels are equal (separate tensors, so that editing one side
        in place never changes the other)."""
        return cls._family_of(family, order, group, order.clone(), group.clone(),
                              doc, None if doc is None else doc.clone())

    @classmethod
    def causal(cls, seq_len: int, device: DeviceLike = None, *, documents: Optional[torch.Tensor] = None) -> "Mask":
        """Causal mask: query i sees keys j <= i (order = group = position); with ``documents``,
        only keys of its own document (see :func:`document_positions`).

        Example:
            >>> Mask.causal(3).to_dense()[0].int()
            tensor([[1, 0, 0],
                    [1, 1, 0],
                    [1, 1, 1]], dtype=torch.int32)
        """
        seq_len = _seq_len(seq_len)
        doc, pos = document_positions(documents, seq_len, device)
        return cls._same_qk("causal", pos, pos.clone(), doc)

    @classmethod
    def block_causal(cls, seq_len: int, block_size: int, prefix_len: int = 0,
                     device: DeviceLike = None, *, documents: Optional[torch.Tensor] = None) -> "Mask":
        """Block-causal (semi-autoregressive) mask with a bidirectional prompt.

        The prompt (positions < prefix_len) is block 0; the rest is cut into blocks of block_size
        (the last may be shorter). A query sees every key of its own and earlier blocks
        (order = group = block id). With ``documents`` (packed sequences), every document starts
        its own prompt and blocks at its first token, and sees only itself.

        Example:
            >>> Mask.block_causal(5, 2, prefix_len=1).q_order
            tensor([[0, 1, 1, 2, 2]], dtype=torch.int32)
            >>> Mask.block_causal(4, 2).to_dense()[0].int()
            tensor([[1, 1, 0, 0],
                    [1, 1, 0, 0],
                    [1, 1, 1, 1],
                    [1, 1, 1, 1]], dtype=torch.int32)
        """
        seq_len = _seq_len(seq_len)
        block_size = _block_size(block_size, seq_len)
        prefix_len = _prefix_len(prefix_len, seq_len)
        doc, pos = document_positions(documents, seq_len, device)
        first_block = 1 if prefix_len > 0 else 0
        block = torch.where(pos < prefix_len, 0,
                            torch.div(pos - prefix_len, block_size, rounding_mode="floor") + first_block)
        block = block.to(torch.int32)
        return cls._same_qk("block_causal", block, block.clone(), doc)

    @classmethod
    def block_diagonal(cls, seq_len: int, block_size: int, device: DeviceLike = None, *,
                       documents: Optional[torch.Tensor] = None) -> "Mask":
        """Block-diagonal mask: a query sees exactly the keys of its own block of block_size
        (order all 0, group = block id); with ``documents``, blocks restart at each document.

        Example:
            >>> Mask.block_diagonal(5, 2).q_group
            tensor([[0, 0, 1, 1, 2]], dtype=torch.int32)
        """
        seq_len = _seq_len(seq_len)
        block_size = _block_size(block_size, seq_len)
        doc, pos = document_positions(documents, seq_len, device)
        block = torch.div(pos, block_size, rounding_mode="floor")
        return cls._same_qk("block_diagonal", torch.zeros_like(block), block, doc)

    @classmethod
    def prefix_lm(cls, seq_len: int, prefix_len: int, device: DeviceLike = None, *,
                  documents: Optional[torch.Tensor] = None) -> "Mask":
        """Prefix-LM mask: the prompt (positions < prefix_len) is bidirectional, the response is
        causal and sees the whole prompt. Prompt labels: order 0, group 0; response position i:
        order = group = i. With ``documents``, every document has its own prompt of prefix_len
        tokens (positions counted from the document's start).

        Example:
            >>> Mask.prefix_lm(4, 2).to_dense()[0].int()
            tensor([[1, 1, 0, 0],
                    [1, 1, 0, 0],
                    [1, 1, 1, 0],
                    [1, 1, 1, 1]], dtype=torch.int32)
        """
        seq_len = _seq_len(seq_len)
        prefix_len = _prefix_len(prefix_len, seq_len)
        doc, pos = document_positions(documents, seq_len, device)
        label = torch.where(pos < prefix_len, 0, pos).to(torch.int32)
        return cls._same_qk("prefix_lm", label, label.clone(), doc)

    @classmethod
    def bd3_train(cls, seq_len: int, block_size: int, device: DeviceLike = None, *,
                  documents: Optional[torch.Tensor] = None) -> "Mask":
        """BD3-LM training mask over the 2*seq_len sequence ``[x_t ; x_0]``.

        With k the block id of a position: an x_t query of block k sees the x_t keys of block k and
        the x_0 keys of blocks < k; an x_0 query of block k sees the x_0 keys of blocks <= k.
        Labels: x_t queries order = group = k; x_t keys order = INT32_MAX, group = k; x_0 queries
        order = k + 1, group = -2; x_0 keys order = k, group = -1.

        ``documents`` (int ``[B, seq_len]`` or ``[seq_len]``, the documents packed into x_0 and
        likewise into x_t): blocks restart at each document, and both halves of a document see
        only that document (packed BD3-LM training; see :func:`document_positions`).

        Example:
            >>> Mask.bd3_train(2, 1).to_dense()[0].int()      # rows/cols: xt0 xt1 x0_0 x0_1
            tensor([[1, 0, 0, 0],
                    [0, 1, 1, 0],
                    [0, 0, 1, 0],
                    [0, 0, 1, 1]], dtype=torch.int32)
        """
        seq_len = _seq_len(seq_len)
        block_size = _block_size(block_size, seq_len)
        doc, pos = document_positions(documents, seq_len, device)
        block = torch.div(pos, block_size, rounding_mode="floor")
        full = torch.full_like(block, INT32_MAX)
        q_order = torch.cat([block, block + 1], dim=1)
        q_group = torch.cat([block, torch.full_like(block, -2)], dim=1)
        k_order = torch.cat([full, block], dim=1)
        k_group = torch.cat([block, torch.full_like(block, -1)], dim=1)
        both_halves = None if doc is None else torch.cat([doc, doc], dim=1)
        return cls._family_of("bd3_train", q_order, q_group, k_order, k_group,
                              both_halves, None if doc is None else both_halves.clone())

    @classmethod
    def eso(cls, order_rank: torch.Tensor, is_clean: torch.Tensor, variant: str, *,
            documents: Optional[torch.Tensor] = None) -> "Mask":
        """Eso-LM masks from each token's sorted slot ``order_rank`` (clean tokens first).

        ``order_rank``: integer ``[B, L]`` (or ``[L]``), ``is_clean``: bool ``[B, L]`` (or ``[L]``);
        their batches broadcast. Variant ``"B"`` (diffusion, causal in sorted order): order = group
        = r, so a token sees the tokens of rank <= its own. Variant ``"A"`` ("mixed2"): clean tokens
        see each other bidirectionally; masks are causal in rank and see all clean tokens. Labels:
        clean order = r, group 0; mask order = r, group -1 - r. Pass int32 ranks to avoid a host
        read (the int64 range check). With ``documents``, each document of a packed row sees only
        itself (ranks order the tokens within each document).

        Example:
            >>> rank = torch.tensor([[2, 0, 1]])            # token 1 then 2 clean, token 0 last
            >>> clean = torch.tensor([[False, True, True]])
            >>> Mask.eso(rank, clean, "A").to_dense()[0].int()
            tensor([[1, 1, 1],
                    [0, 1, 1],
                    [0, 1, 1]], dtype=torch.int32)
        """
        if variant not in ("A", "B"):
            raise ValueError(f"Mask.eso: variant must be 'A' or 'B', got {variant!r}")
        rank = _to_int32_labels("order_rank", order_rank)
        clean = _check_bool("is_clean", is_clean)
        if rank.shape[1] != clean.shape[1] or _common_batch(
                {"order_rank": rank.shape[0], "is_clean": clean.shape[0]}) is None:
            raise ValueError(
                f"Mask.eso: order_rank and is_clean must have the same [B, L] shape (batch 1 "
                f"broadcasts), got {list(order_rank.shape)} and {list(is_clean.shape)}"
            )
        if clean.device != rank.device:
            raise TypeError(f"Mask.eso: order_rank is on {rank.device} but is_clean is on {clean.device}")
        batch = max(rank.shape[0], clean.shape[0])
        order = rank.expand(batch, -1).clone()  # never alias the caller's tensor
        if variant == "B":
            group = order.clone()
        else:
            group = torch.where(clean, torch.zeros_like(order), -1 - order).to(torch.int32)
        doc = None if documents is None else document_positions(documents, order.shape[1], order.device)[0]
        return cls._same_qk(f"eso_{variant}", order, group, doc)

    @classmethod
    def clean_and_self(cls, is_clean: torch.Tensor, *, documents: Optional[torch.Tensor] = None) -> "Mask":
        """Masks see the clean keys and themselves, not other masks; clean tokens see clean keys
        (with ``documents``, those of their own document only).

        ``is_clean``: bool ``[B, L]`` (or ``[L]``). Labels: clean rows order 0, group -1; mask rows
        order 1, group = own position.

        Example:
            >>> Mask.clean_and_self(torch.tensor([True, False, False])).to_dense()[0].int()
            tensor([[1, 0, 0],
                    [1, 1, 0],
                    [1, 0, 1]], dtype=torch.int32)
        """
        clean = _check_bool("is_clean", is_clean)
        pos = torch.arange(clean.shape[1], dtype=torch.int32, device=clean.device)
        order = (~clean).to(torch.int32)
        group = torch.where(clean, torch.full_like(order, -1), pos).to(torch.int32)
        doc = None if documents is None else document_positions(documents, clean.shape[1], clean.device)[0]
        return cls._same_qk("clean_and_self", order, group, doc)

    @classmethod
    def bidirectional(cls, seq_len: int, k_len: Optional[int] = None,
                      device: DeviceLike = None, *, documents: Optional[torch.Tensor] = None) -> "Mask":
        """Everything visible (all labels 0); ``k_len`` defaults to ``seq_len``. Passing
        ``mask=None`` to attention is equivalent and faster. With ``documents`` (``k_len`` must
        then equal ``seq_len``), each document of a packed row is bidirectional and sees only itself.

        Example:
            >>> Mask.bidirectional(2, k_len=3).to_dense().shape
            torch.Size([1, 2, 3])
        """
        seq_len = _seq_len(seq_len)
        k_len = seq_len if k_len is None else _seq_len(k_len, "k_len")
        if device is None and isinstance(documents, torch.Tensor):
            device = documents.device  # (as every constructor: the labels live where the ids do)
        device = _default_device(device)
        zeros_q = torch.zeros(1, seq_len, dtype=torch.int32, device=device)
        zeros_k = torch.zeros(1, k_len, dtype=torch.int32, device=device)
        doc = None
        if documents is not None:
            if k_len != seq_len:
                raise ValueError(f"Mask.bidirectional: documents need k_len == seq_len, got {k_len} and {seq_len}")
            doc = document_positions(documents, seq_len, device)[0]
        return cls._family_of("bidirectional", zeros_q, zeros_q.clone(), zeros_k, zeros_k.clone(),
                              doc, None if doc is None else doc.clone())

