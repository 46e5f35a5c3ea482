r"""RetinaMask: RetinaNet plus a mask subnet, with one backward through eq. (2).

    images -> ResNet -> C3..C5 -> FPN -> P3..P7
        class subnet  -> focal loss over every anchor            L_cls
        box subnet    -> smooth L1 over the positive anchors     L_loc
        detections (+ ground-truth boxes) as RoIs -> RoIAlign at the level
        of eq. (1) -> mask subnet -> BCE on the RoI's class, eq. (3)  L_mask

    L = L_cls + L_loc + L_mask                                    eq. (2)

``loss`` runs the forward pass, the three losses, and the backward pass
through all of it, leaving every ``Parameter.grad`` equal to dL/dparameter.
The gradient reaches the backbone from all three terms: the mask loss's
share is what the RetinaMask paper credits for better boxes "for free".

``predict`` runs the forward pass, post-processing (score threshold, top-k
per level, decoding, class-wise NMS, top-N) and the mask subnet on the kept
detections only, and pastes each mask into its box.
"""
from __future__ import annotations

import numpy as np

from minimask.anchors import IGNORED, flatten_head_output, generate_anchors, match_anchors, unflatten_head_grad
from minimask.boxes import batched_nms, box_iou, clip_boxes, decode_boxes, encode_boxes
from minimask.layers import (mask_bce_backward, mask_bce_forward, sigmoid_focal_loss_backward,
                             sigmoid_focal_loss_forward, smooth_l1_backward, smooth_l1_forward)
from minimask.layers.activations import sigmoid_numpy
from minimask.masks import mask_targets, paste_masks
from minimask.model.backbone import ResNet
from minimask.model.config import Config
from minimask.model.fpn import FPN
from minimask.model.heads import DenseHead, MaskHead, class_prior_bias
from minimask.model.poolers import MultiLevelRoIAlign
from minimask.nn import Module


class RetinaMask(Module):
    def __init__(self, config: Config):
        config = config.validated()
        self.config = config
        rng = np.random.default_rng(config.seed)
        dtype = np.dtype(config.dtype)
        self.dtype = dtype
        C = config.fpn_channels
        self.backbone = ResNet(stem_channels=config.stem_channels, stem_kernel=config.stem_kernel,
                               blocks=config.blocks, widths=config.widths, block=config.block,
                               rng=rng, dtype=dtype)
        self.fpn = FPN(self.backbone.out_channels, C, rng=rng, dtype=dtype)
        self.cls_head = DenseHead(C, config.head_convs, config.num_anchors, config.num_classes,
                                  rng=rng, dtype=dtype, norm=config.head_norm,
                                  bias_value=class_prior_bias(config.class_prior))
        self.box_head = DenseHead(C, config.head_convs, config.num_anchors, 4, rng=rng,
                                  dtype=dtype, norm=config.head_norm)
        self.mask_head = MaskHead(C, config.mask_convs, config.num_classes, rng=rng, dtype=dtype,
                                  upsample=config.mask_upsample, width=config.mask_channels)
        self.pooler = MultiLevelRoIAlign(
            output_size=config.mask_size // 2, sampling_ratio=config.roi_sampling_ratio,
            mode=config.roi_mode, canonical_size=config.canonical_size,
            canonical_level=config.canonical_level, min_level=config.roi_min_level,
            max_level=config.roi_max_level, first_level=3)
        self._anchor_cache = {}
        # running mean and variance of |box error| for the self-adjusting beta
        self.beta_stats = np.array([config.box_beta, 0.0])

    # ------------------------------------------------------------------
    # input checks
    # ------------------------------------------------------------------

    def _check_images(self, images):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {images.shape}")
        if images.dtype.kind != "f":
            raise ValueError(f"images must be float32 (values roughly in [0, 1] or normalised), "
                             f"got dtype {images.dtype}")
        if images.shape[0] == 0 or images.shape[2] < 8 or images.shape[3] < 8:
            raise ValueError(f"images must hold at least one image of at least 8x8 pixels, "
                             f"got shape {images.shape}")
        if not np.all(np.isfinite(images)):
            raise ValueError("images contain NaN or infinite pixels")
        return np.ascontiguousarray(images, dtype=self.dtype)

    def _check_targets(self, targets, images):
        N, _, H, W = images.shape
        if not isinstance(targets, (list, tuple)) or len(targets) != N:
            raise ValueError(f"targets must be a list of {N} dicts (one per image), got "
                             f"{type(targets).__name__} of length {len(targets) if hasattr(targets, '__len__') else '?'}")
        K = self.config.num_classes
        checked = []
        for n, t in enumerate(targets):
            for key in ("boxes", "labels", "masks"):
                if key not in t:
                    raise ValueError(f"targets[{n}] has no {key!r}")
            boxes = np.asarray(t["boxes"], dtype=np.float64).reshape(-1, 4) if np.size(t["boxes"]) else np.zeros((0, 4))
            labels = np.asarray(t["labels"]).reshape(-1)
            masks = np.asarray(t["masks"])
            G = len(boxes)
            if labels.shape != (G,) or (G and labels.dtype.kind not in "iu"):
                raise ValueError(f"targets[{n}]['labels'] must be {G} integers, got shape "
                                 f"{labels.shape} dtype {labels.dtype}")
            if G and (labels.min() < 0 or labels.max() >= K):
                raise ValueError(f"targets[{n}]['labels'] must lie in [0, {K}), got {labels.tolist()}")
            if G == 0:
                masks = np.zeros((0, H, W), dtype=bool)
            if masks.shape != (G, H, W):
                raise ValueError(f"targets[{n}]['masks'] must have shape ({G}, {H}, {W}), got {masks.shape}")
            if not np.all(np.isfinite(boxes)):
                raise ValueError(f"targets[{n}]['boxes'] contains NaN or infinity")
            wh = boxes[:, 2:] - boxes[:, :2]
            if np.any(wh <= 0):
                bad = int(np.flatnonzero(np.any(wh <= 0, axis=1))[0])
                raise ValueError(f"targets[{n}]['boxes'][{bad}] = {boxes[bad].tolist()} has zero "
                                 f"or negative area (boxes are x1, y1, x2, y2 with x2 > x1, y2 > y1)")
            # Clip to the image before anything uses them: the part of a box
            # outside the image holds no pixel and no mask, and a box of
            # 10^6 pixels would make RoIAlign's adaptive grid sample ~10^12
            # points. A box with no area inside the image is refused.
            clipped = boxes.copy()
            clipped[:, 0::2] = np.clip(boxes[:, 0::2], 0, W)
            clipped[:, 1::2] = np.clip(boxes[:, 1::2], 0, H)
            inside = np.all(clipped[:, 2:] - clipped[:, :2] > 0, axis=1)
            if not np.all(inside):
                bad = int(np.flatnonzero(~inside)[0])
                raise ValueError(f"targets[{n}]['boxes'][{bad}] = {boxes[bad].tolist()} lies "
                                 f"outside the {W}x{H} (WxH) image")
            boxes = clipped
            checked.append({"boxes": boxes, "labels": labels.astype(np.int64), "masks": masks})
        return checked

    # ------------------------------------------------------------------
    # the shared forward pieces
    # ------------------------------------------------------------------

    def _anchors(self, P):
        shapes = tuple(tuple(p.shape[2:]) for p in P)
        if shapes not in self._anchor_cache:
            c = self.config
            self._anchor_cache[shapes] = generate_anchors(shapes, c.strides, c.anchor_sizes,
                                                          c.anchor_ratios, c.anchor_scales)
        return self._anchor_cache[shapes]

    def _forward_dense(self, images):
        C, backbone_cache = self.backbone.forward(images)
        P, fpn_cache = self.fpn.forward(C)
        cls_maps, cls_cache = self.cls_head.forward(P)
        box_maps, box_cache = self.box_head.forward(P)
        K = self.config.num_classes
        logits = np.concatenate([flatten_head_output(m, K) for m in cls_maps], axis=1)
        deltas = np.concatenate([flatten_head_output(m, 4) for m in box_maps], axis=1)
        cache = (backbone_cache, fpn_cache, cls_cache, box_cache,
                 [m.shape for m in cls_maps], [m.shape for m in box_maps])
        return P, logits, deltas, cache

    def _backward_dense(self, dlogits, ddeltas, dP_extra, cache):
        backbone_cache, fpn_cache, cls_cache, box_cache, cls_shapes, box_shapes = cache
        dcls, dbox, start = [], [], 0
        for cs, bs in zip(cls_shapes, box_shapes):
            n = cs[2] * cs[3] * self.config.num_anchors
            dcls.append(unflatten_head_grad(dlogits[:, start:start + n], cs))
            dbox.append(unflatten_head_grad(ddeltas[:, start:start + n], bs))
            start += n
        dP = [a + b for a, b in zip(self.cls_head.backward(dcls, cls_cache),
                                    self.box_head.backward(dbox, box_cache))]
        if dP_extra is not None:
            dP = [a + b for a, b in zip(dP, dP_extra)]
        dC = self.fpn.backward(dP, fpn_cache)
        self.backbone.backward(dC, backbone_cache)

    def _detect_one(self, logits, deltas, anchors_per_level, height, width):
        """Post-processing of one image: (boxes, scores, labels)."""
        c = self.config
        K = c.num_classes
        # score > t  <=>  logit > log(t / (1 - t)): threshold before the sigmoid
        logit_thresh = (np.log(c.score_thresh / (1 - c.score_thresh))
                        if 0 < c.score_thresh < 1 else (-np.inf if c.score_thresh <= 0 else np.inf))
        boxes_all, scores_all, labels_all = [], [], []
        start = 0
        for anchors in anchors_per_level:
            n = len(anchors)
            lg = logits[start:start + n].reshape(-1)
            dl = deltas[start:start + n]
            start += n
            keep = np.flatnonzero(lg > logit_thresh)
            if len(keep) > c.topk_per_level:
                keep = keep[np.argpartition(-lg[keep], c.topk_per_level - 1)[:c.topk_per_level]]
            if len(keep) == 0:
                continue
            anchor_idx, label = keep // K, keep % K
            boxes_all.append(decode_boxes(dl[anchor_idx].astype(np.float64), anchors[anchor_idx]))
            scores_all.append(sigmoid_numpy(lg[keep].astype(np.float64)))
            labels_all.append(label)
        if not boxes_all:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
        boxes = clip_boxes(np.concatenate(boxes_all), height, width)
        scores, labels = np.concatenate(scores_all), np.concatenate(labels_all)
        big = np.all(boxes[:, 2:] - boxes[:, :2] > 1e-2, axis=1)
        boxes, scores, labels = boxes[big], scores[big], labels[big]
        keep = batched_nms(boxes, scores, labels, c.nms_thresh)[:c.detections_per_image]
        return boxes[keep], scores[keep], labels[keep].astype(np.int64)

    # ------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------

    def _box_beta(self, errors):
        c = self.config
        if not c.self_adjusting_beta or errors.size == 0:
            return c.box_beta
        # RetinaMask's self-adjusting smooth L1: beta follows the running
        # mean minus variance of |error|, clipped to (0, box_beta].
        momentum = 0.9
        self.beta_stats = momentum * self.beta_stats + (1 - momentum) * np.array(
            [errors.mean(), errors.var()])
        return float(np.clip(self.beta_stats[0] - self.beta_stats[1], 1e-3, c.box_beta))

    def _mask_rois(self, logits, deltas, anchors_per_level, targets, height, width):
        """Training RoIs: every ground-truth box, plus each detection whose
        IoU with a ground truth is at least ``mask_roi_iou``. Returns rois
        (R, 5), labels (R,), mask targets (R, m, m)."""
        c = self.config
        rois, labels, mtargets = [], [], []
        for n, t in enumerate(targets):
            G = len(t["boxes"])
            if G == 0:
                continue
            boxes, gt_index = [t["boxes"]], [np.arange(G)]
            if c.mask_rois_from_detections:
                det_boxes, _, _ = self._detect_one(logits[n], deltas[n], anchors_per_level,
                                                   height, width)
                if len(det_boxes):
                    iou = box_iou(det_boxes, t["boxes"])
                    best = iou.argmax(1)
                    good = iou[np.arange(len(det_boxes)), best] >= c.mask_roi_iou
                    boxes.append(det_boxes[good])
                    gt_index.append(best[good])
            boxes = np.concatenate(boxes)[:c.max_mask_rois]
            gt_index = np.concatenate(gt_index)[:c.max_mask_rois]
            rois.append(np.concatenate([np.full((len(boxes), 1), n), boxes], axis=1))
            labels.append(t["labels"][gt_index])
            mtargets.append(mask_targets(t["masks"][gt_index], boxes, c.mask_size))
        if not rois:
            return None
        return (np.concatenate(rois).astype(self.dtype), np.concatenate(labels),
                np.concatenate(mtargets).astype(self.dtype))

    def loss(self, images, targets, terms=("cls", "box", "mask")) -> dict:
        """Forward, eq. (2), and backward: returns {"cls", "box", "mask",
        "total", "num_pos", "num_mask_rois"} and leaves each Parameter.grad
        equal to d total / d parameter (previous gradients are cleared).

        ``terms`` picks which terms the backward pass differentiates (all
        three are always computed and reported); e.g. ``terms=("mask",)``
        shows what the mask loss alone sends to the backbone."""
        c = self.config
        unknown = set(terms) - {"cls", "box", "mask"}
        if unknown:
            raise ValueError(f"terms must be among 'cls', 'box', 'mask', got {sorted(unknown)}")
        w_cls, w_box, w_mask = ("cls" in terms), ("box" in terms), ("mask" in terms)
        images = self._check_images(images)
        targets = self._check_targets(targets, images)
        N, _, H, W = images.shape
        self.zero_grad()

        P, logits, deltas, dense_cache = self._forward_dense(images)
        anchors_per_level = self._anchors(P)
        anchors = np.concatenate(anchors_per_level)

        # --- targets for the dense heads ---
        cls_targets = np.zeros_like(logits)
        weights = np.ones_like(logits)
        positive = np.zeros(logits.shape[:2], dtype=bool)
        box_targets = np.zeros_like(deltas)
        for n, t in enumerate(targets):
            matches = match_anchors(anchors, t["boxes"], c.pos_iou, c.neg_iou,
                                    c.low_quality_matches)
            pos = matches >= 0
            positive[n] = pos
            cls_targets[n, pos, t["labels"][matches[pos]]] = 1
            weights[n, matches == IGNORED] = 0
            if pos.any():
                box_targets[n, pos] = encode_boxes(t["boxes"][matches[pos]], anchors[pos])
        num_pos = max(1, int(positive.sum()))

        # --- L_cls: focal loss, summed, divided by the number of positives ---
        l_cls, focal_cache = sigmoid_focal_loss_forward(
            logits, cls_targets, alpha=c.focal_alpha, gamma=c.focal_gamma, weights=weights,
            reduction="sum")
        l_cls = float(l_cls) / num_pos

        # --- L_loc: smooth L1 on the positive anchors ---
        ddeltas = np.zeros_like(deltas)
        l_box = 0.0
        if positive.any():
            pred, target = deltas[positive], box_targets[positive]
            beta = self._box_beta(np.abs(pred - target))
            l_box, box_cache = smooth_l1_forward(pred, target, beta=beta, reduction="sum")
            l_box = float(l_box) / num_pos
            ddeltas[positive] = smooth_l1_backward(np.asarray(w_box / num_pos, self.dtype), box_cache)

        # --- L_mask: eq. (3) on the RoIs' own class channels ---
        l_mask, dP_mask, num_rois = 0.0, None, 0
        mask_batch = self._mask_rois(logits, deltas, anchors_per_level, targets, H, W)
        if mask_batch is not None:
            rois, labels, mtargets = mask_batch
            num_rois = len(rois)
            roi_features, pool_cache = self.pooler.forward(P, rois)
            mask_logits, head_cache = self.mask_head.forward(roi_features)
            l_mask, bce_cache = mask_bce_forward(mask_logits, labels, mtargets)
            l_mask = float(l_mask)
            dmask = mask_bce_backward(np.asarray(w_mask * c.mask_loss_weight, self.dtype), bce_cache)
            droi = self.mask_head.backward(dmask, head_cache)
            dP_mask = self.pooler.backward(droi, pool_cache)

        # --- backward through the heads, the FPN and the backbone ---
        dlogits = sigmoid_focal_loss_backward(np.asarray(w_cls / num_pos, self.dtype), focal_cache)
        self._backward_dense(np.asarray(dlogits), ddeltas, dP_mask, dense_cache)
        total = l_cls + l_box + c.mask_loss_weight * l_mask
        return {"cls": l_cls, "box": l_box, "mask": l_mask, "total": total,
                "num_pos": int(positive.sum()), "num_mask_rois": num_rois}

    # ------------------------------------------------------------------
    # inference
    # ------------------------------------------------------------------

    def predict(self, images, return_probabilities: bool = False) -> list[dict]:
        """Detections per image: boxes (D, 4), scores (D,), labels (D,),
        masks (D, H, W) bool - the masks of the top detections only, pasted
        into their boxes and thresholded.

        With ``return_probabilities=True`` each dict also holds the step
        before pasting: ``class_masks`` (D, K, m, m), the sigmoid of the mask
        subnet's output for every class, and ``mask_probs`` (D, m, m), the
        predicted class's mask, ``class_masks[d, labels[d]]`` - the one
        that is pasted."""
        c = self.config
        images = self._check_images(images)
        N, _, H, W = images.shape
        P, logits, deltas, _ = self._forward_dense(images)
        anchors_per_level = self._anchors(P)
        results = []
        for n in range(N):
            boxes, scores, labels = self._detect_one(logits[n], deltas[n], anchors_per_level, H, W)
            masks = np.zeros((len(boxes), H, W), dtype=bool)
            mask_probs = np.zeros((0, c.mask_size, c.mask_size))
            class_masks = np.zeros((0, c.num_classes, c.mask_size, c.mask_size))
            if len(boxes):
                rois = np.concatenate([np.full((len(boxes), 1), n), boxes], 1).astype(self.dtype)
                roi_features, _ = self.pooler.forward(P, rois)
                mask_logits = np.asarray(self.mask_head.forward(roi_features)[0])
                if return_probabilities:
                    class_masks = sigmoid_numpy(mask_logits.astype(np.float64))
                    mask_probs = class_masks[np.arange(len(boxes)), labels]
                else:           # only the predicted class's channel is needed
                    chosen = mask_logits[np.arange(len(boxes)), labels]
                    mask_probs = sigmoid_numpy(chosen.astype(np.float64))
                masks = paste_masks(mask_probs, boxes, H, W, c.mask_threshold)
            result = {"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32),
                      "labels": labels, "masks": masks}
            if return_probabilities:
                result.update(class_masks=class_masks, mask_probs=mask_probs)
            results.append(result)
        return results
