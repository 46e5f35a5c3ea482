r"""RetinaMask: RetinaNet plus a mask subnet, with one backward through eq. (2).

    images -> ResNet -> C3..C5 -> FPN -> P3..P7   (and C2 -> P2 for the masks when
                                                  config.roi_min_level == 2)
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

from minimask.anchors import IGNORED, generate_anchors, match_anchors
from minimask.backend import current_backend
from minimask.boxes import batched_nms, box_iou, clip_boxes, decode_boxes, encode_boxes
from minimask.layers import glue
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
        # a P2 (stride 4, from C2) exists only when the mask RoIs may read it
        with_p2 = config.roi_min_level == 2
        if config.backbone == "frozenbn":    # torchvision's layout, for pretrained weights
            from minimask.model.frozen_resnet import TorchvisionResNet
            self.backbone = TorchvisionResNet(
                stem_channels=config.stem_channels, blocks=config.blocks, widths=config.widths,
                block=config.block, rng=rng, dtype=dtype, eps=config.frozen_bn_eps,
                trainable_stages=config.trainable_stages, with_c2=with_p2)
        else:
            self.backbone = ResNet(stem_channels=config.stem_channels,
                                   stem_kernel=config.stem_kernel, blocks=config.blocks,
                                   widths=config.widths, block=config.block, rng=rng, dtype=dtype,
                                   with_c2=with_p2)
        self.fpn = FPN(self.backbone.out_channels, C, rng=rng, dtype=dtype,
                       p6_input=config.p6_input)
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
            max_level=config.roi_max_level, first_level=2 if with_p2 else 3)
        self._anchor_cache = {}
        # running mean and variance of |box error| for the self-adjusting
        # beta: a buffer, so a checkpoint carries it and a resumed run goes on
        # exactly as an uninterrupted one
        self.register_buffer("beta_stats", np.array([config.box_beta, 0.0]))

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

    def _anchors(self, P, image_hw=None):
        shapes = tuple(tuple(p.shape[2:]) for p in P)
        c = self.config
        strides = c.strides
        if c.anchor_stride_from_image and image_hw is not None:   # torchvision's convention
            strides = [(image_hw[0] // h, image_hw[1] // w) for h, w in shapes]
        key = (shapes, tuple(map(tuple, np.reshape(strides, (len(shapes), -1)))))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = generate_anchors(
                shapes, strides, c.anchor_sizes, c.anchor_ratios, c.anchor_scales,
                offset=c.anchor_offset, size_floor=c.anchor_size_floor,
                round_corners=c.anchor_round)
        return self._anchor_cache[key]

    def normalize_images(self, images):
        """Images as the weights expect them: channel order, then
        ``(x - pixel_mean) / pixel_std`` per channel (the identity for
        minimask's own presets)."""
        c = self.config
        if c.channel_order == "BGR":
            images = images[:, ::-1]
        if c.pixel_mean == (0.0, 0.0, 0.0) and c.pixel_std == (1.0, 1.0, 1.0) \
                and c.channel_order == "RGB":
            return images
        mean = np.asarray(c.pixel_mean, dtype=images.dtype).reshape(1, 3, 1, 1)
        std = np.asarray(c.pixel_std, dtype=images.dtype).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((images - mean) / std, dtype=images.dtype)

    def _forward_dense(self, images):
        """The dense forward on images already normalised (``normalize_images``,
        done on the host before the copy to the backend's device)."""
        C, backbone_cache = self.backbone.forward(images)
        P, fpn_cache = self.fpn.forward(C)
        P2 = None
        if self.fpn.with_p2:        # P2 is for the mask RoIs only
            P2, P = P[0], P[1:]
        cls_maps, cls_cache = self.cls_head.forward(P)
        box_maps, box_cache = self.box_head.forward(P)
        K = self.config.num_classes
        # (N, A_total, K) and (N, A_total, 4), on the current backend's device
        logits = glue.flatten_heads(cls_maps, K)
        deltas = glue.flatten_heads(box_maps, 4)
        cache = (backbone_cache, fpn_cache, cls_cache, box_cache,
                 [tuple(m.shape) for m in cls_maps], [tuple(m.shape) for m in box_maps], P2)
        return P, logits, deltas, cache

    @staticmethod
    def _mask_levels(P, cache):
        """The maps the mask RoIs are pooled from: P3..P7 (``P``, what
        ``_forward_dense`` returned), with P2 in front when the FPN builds it."""
        P2 = cache[-1]
        return list(P) if P2 is None else [P2] + list(P)

    def _backward_dense(self, dlogits, ddeltas, dP_extra, cache):
        """dP_extra: gradients of the ``_mask_levels`` maps (or None)."""
        backbone_cache, fpn_cache, cls_cache, box_cache, cls_shapes, box_shapes, P2 = cache
        dcls = glue.unflatten_heads(dlogits, cls_shapes)
        dbox = glue.unflatten_heads(ddeltas, box_shapes)
        dP = [glue.add(a, b) for a, b in zip(self.cls_head.backward(dcls, cls_cache),
                                             self.box_head.backward(dbox, box_cache))]
        dP2 = None
        if P2 is not None:
            if dP_extra is None:
                dP2 = current_backend().zeros(tuple(P2.shape), P2.dtype)
            else:
                dP2, dP_extra = dP_extra[0], dP_extra[1:]
        if dP_extra is not None:
            dP = [glue.add(a, b) for a, b in zip(dP, dP_extra)]
        if dP2 is not None:
            dP = [dP2] + dP
        dC = self.fpn.backward(dP, fpn_cache)
        self.backbone.backward(dC, backbone_cache, need_input_grad=False)   # no d(images)

    def _detect_one(self, logits, deltas, anchors_per_level, height, width):
        """Post-processing of one image: (boxes, scores, labels)."""
        c = self.config
        K = c.num_classes
        # score > t  <=>  logit > log(t / (1 - t)): threshold before the sigmoid
        logit_thresh = (np.log(c.score_thresh / (1 - c.score_thresh))
                        if 0 < c.score_thresh < 1 else (-np.inf if c.score_thresh <= 0 else np.inf))
        boxes_all, scores_all, labels_all = [], [], []
        # the (flat) entries above the threshold and their logits, on the
        # host; on "cuda" only these few cross, not the whole map
        cand, cand_logits = self._candidates(logits, logit_thresh)
        start = 0
        for anchors in anchors_per_level:
            n = len(anchors)
            lo, hi = np.searchsorted(cand, [start * K, (start + n) * K])
            keep, lg = cand[lo:hi] - start * K, cand_logits[lo:hi]
            if len(keep) > c.topk_per_level:
                top = np.argpartition(-lg, c.topk_per_level - 1)[:c.topk_per_level]
                keep, lg = keep[top], lg[top]
            if len(keep) == 0:
                start += n
                continue
            anchor_idx, label = keep // K, keep % K
            dl = self._rows_on_host(deltas, start + anchor_idx)
            start += n
            boxes_all.append(decode_boxes(dl.astype(np.float64), anchors[anchor_idx],
                                          c.box_weights))
            scores_all.append(sigmoid_numpy(lg.astype(np.float64)))
            labels_all.append(label)
        if not boxes_all:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
        boxes = clip_boxes(np.concatenate(boxes_all), height, width)
        scores, labels = np.concatenate(scores_all), np.concatenate(labels_all)
        big = np.all(boxes[:, 2:] - boxes[:, :2] > 1e-2, axis=1)
        boxes, scores, labels = boxes[big], scores[big], labels[big]
        keep = batched_nms(boxes, scores, labels, c.nms_thresh)[:c.detections_per_image]
        return boxes[keep], scores[keep], labels[keep].astype(np.int64)

    @staticmethod
    def _candidates(logits, logit_thresh, capacity=1 << 16):
        """``(flat indices, logits)`` of the entries of one image's logits
        (A_total, K) above ``logit_thresh``, indices ascending. On the device
        they are compacted there; more than ``capacity`` (a network that
        scores most anchors high) falls back to copying the logits whole."""
        be = current_backend()
        if isinstance(logits, np.ndarray) or not be.on_device:
            flat = np.asarray(logits).reshape(-1)
            idx = np.flatnonzero(flat > logit_thresh)
            return idx, flat[idx]
        flat = logits.reshape(logits.size)
        idx = glue.above(flat, logit_thresh, capacity, be)
        if idx is None:
            host = be.to_host(flat)
            idx = np.flatnonzero(host > logit_thresh)
            return idx, host[idx]
        if len(idx) == 0:
            return idx, np.zeros(0, dtype=logits.dtype)
        return idx, be.to_host(glue.take_rows(flat, idx, be))

    @staticmethod
    def _rows_on_host(x, rows):
        """``x[rows]`` as a host array (only those rows cross from a device)."""
        if isinstance(x, np.ndarray):
            return x[rows]
        be = current_backend()
        return be.to_host(glue.take_rows(x, rows, be))

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
        be = current_backend()
        self.to_backend(be)        # parameters on this backend's device (once)
        self.zero_grad()

        P, logits, deltas, dense_cache = self._forward_dense(
            be.asarray(self.normalize_images(images)))
        anchors_per_level = self._anchors(P, (H, W))
        anchors = np.concatenate(anchors_per_level)
        A, K = logits.shape[1], logits.shape[2]

        # --- targets for the dense heads: matched on the host (boxes only),
        # written on the device from a few indices ---
        cls_targets = be.zeros(logits.shape, logits.dtype)
        weights = be.empty(logits.shape, logits.dtype)
        glue.fill(weights, 1, be)
        pos_rows, pos_targets, hot, ignored = [], [], [], []
        for n, t in enumerate(targets):
            matches = match_anchors(anchors, t["boxes"], c.pos_iou, c.neg_iou,
                                    c.low_quality_matches, low_quality_iou=c.low_quality_iou)
            pos = np.flatnonzero(matches >= 0)
            hot.append((n * A + pos) * K + t["labels"][matches[pos]])
            ign = np.flatnonzero(matches == IGNORED)
            ignored.append(((n * A + ign) * K)[:, None] + np.arange(K))
            pos_rows.append(n * A + pos)
            if len(pos):
                pos_targets.append(encode_boxes(t["boxes"][matches[pos]], anchors[pos],
                                                c.box_weights))
        glue.fill_at(cls_targets, np.concatenate(hot), 1, be)
        glue.fill_at(weights, np.concatenate(ignored).reshape(-1), 0, be)
        pos_rows = np.concatenate(pos_rows)     # rows of (N A, 4), ascending
        num_pos = max(1, len(pos_rows))

        # --- L_cls: focal loss, summed, divided by the number of positives ---
        l_cls, focal_cache = sigmoid_focal_loss_forward(
            logits, cls_targets, alpha=c.focal_alpha, gamma=c.focal_gamma, weights=weights,
            reduction="sum")
        l_cls = float(be.to_host(l_cls)) / num_pos

        # --- L_loc: smooth L1 on the positive anchors ---
        ddeltas = be.zeros(deltas.shape, deltas.dtype)
        l_box = 0.0
        if len(pos_rows):
            rows = deltas.reshape(N * A, 4)
            pred = glue.take_rows(rows, pos_rows, be)
            target = be.asarray(np.concatenate(pos_targets).astype(self.dtype))
            if c.self_adjusting_beta:   # its statistics need |pred - target|: #pos x 4 numbers
                beta = self._box_beta(np.abs(be.to_host(pred) - be.to_host(target)))
            else:
                beta = c.box_beta
            l_box, box_cache = smooth_l1_forward(pred, target, beta=beta, reduction="sum")
            l_box = float(be.to_host(l_box)) / num_pos
            glue.put_rows(ddeltas.reshape(N * A, 4), pos_rows,
                          smooth_l1_backward(np.asarray(w_box / num_pos, self.dtype), box_cache),
                          be)

        # --- L_mask: eq. (3) on the RoIs' own class channels ---
        l_mask, dP_mask, num_rois = 0.0, None, 0
        mask_batch = self._mask_rois(logits, deltas, anchors_per_level, targets, H, W)
        if mask_batch is not None:
            rois, labels, mtargets = mask_batch
            num_rois = len(rois)
            roi_features, pool_cache = self.pooler.forward(self._mask_levels(P, dense_cache),
                                                           rois)
            mask_logits, head_cache = self.mask_head.forward(roi_features)
            l_mask, bce_cache = mask_bce_forward(mask_logits, labels, mtargets)
            l_mask = float(be.to_host(l_mask))
            dmask = mask_bce_backward(np.asarray(w_mask * c.mask_loss_weight, self.dtype), bce_cache)
            droi = self.mask_head.backward(dmask, head_cache)
            dP_mask = self.pooler.backward(droi, pool_cache)

        # --- backward through the heads, the FPN and the backbone ---
        dlogits = sigmoid_focal_loss_backward(np.asarray(w_cls / num_pos, self.dtype), focal_cache)
        self._backward_dense(dlogits, ddeltas, dP_mask, dense_cache)
        total = l_cls + l_box + c.mask_loss_weight * l_mask
        return {"cls": l_cls, "box": l_box, "mask": l_mask, "total": total,
                "num_pos": int(len(pos_rows)), "num_mask_rois": num_rois}

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
        be = current_backend()
        self.to_backend(be)
        P, logits, deltas, dense_cache = self._forward_dense(
            be.asarray(self.normalize_images(images)))
        anchors_per_level = self._anchors(P, (H, W))
        mask_levels = self._mask_levels(P, dense_cache)
        del dense_cache     # the backward's caches; the mask levels are kept
        results = []
        for n in range(N):
            boxes, scores, labels = self._detect_one(logits[n], deltas[n], anchors_per_level, H, W)
            masks = np.zeros((len(boxes), H, W), dtype=bool)
            mask_probs = np.zeros((0, c.mask_size, c.mask_size))
            class_masks = np.zeros((0, c.num_classes, c.mask_size, c.mask_size))
            if len(boxes):
                rois = np.concatenate([np.full((len(boxes), 1), n), boxes], 1).astype(self.dtype)
                roi_features, _ = self.pooler.forward(mask_levels, rois)
                mask_logits = be.to_host(self.mask_head.forward(roi_features)[0])
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
