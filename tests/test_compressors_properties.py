"""Each compressor's defining property, as its paper states it (not just its shapes)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vidmem.compressors import build_compressor
from vidmem.compressors.base import TokenBlock, pool_grid
from vidmem.compressors.dynfocus import PerturbedTopK, dpc_knn
from vidmem.compressors.sampler import sincos_2d
from vidmem.compressors.stc import Pruner, prune, salience

DIM = 48
PATCHES = 729


def _features(frames: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(frames, PATCHES, DIM, generator=torch.Generator().manual_seed(seed))


# -- TimePerceiver (Clapper 3.1) --------------------------------------------------------------------------------
def test_untrained_timeperceiver_is_the_keyframe_plus_its_pooled_queries():
    compressor = build_compressor("timeperceiver", dim=DIM, depth=3)
    for frames in (2, 3, 4):
        features = _features(frames)
        block = compressor(features)
        assert block.slow == 196
        torch.testing.assert_close(block.tokens[:196], pool_grid(features[0], 14))  # keyframe, stride 2
        # queries X: stride-4 spatial pooling of every frame, then the mean over time (Clapper 3.1)
        torch.testing.assert_close(block.tokens[196:], pool_grid(features, 7).mean(dim=0))


def test_timeperceiver_output_changes_once_trained_and_sees_frame_order():
    torch.manual_seed(0)
    compressor = build_compressor("timeperceiver", dim=DIM, depth=1, heads=2, dim_head=16)
    features = _features(4)
    pooled = pool_grid(features, 7).mean(dim=0)
    target = torch.randn(49, DIM)
    optimiser = torch.optim.Adam(compressor.parameters(), lr=1e-2)
    for _ in range(15):
        loss = F.mse_loss(compressor(features).tokens[196:], target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    fast = compressor(features).tokens[196:]
    assert not torch.allclose(fast, pooled, atol=1e-3)
    assert F.mse_loss(fast, target) < F.mse_loss(pooled, target)
    # once trained, reversing the frames changes the fast tokens (time embeddings): pooling alone could not tell
    assert not torch.allclose(compressor(features.flip(0)).tokens[196:], fast, atol=1e-4)


def test_untrained_perceiver_baseline_is_safe_too():
    compressor = build_compressor("perceiver", dim=DIM)
    features = _features(3)
    torch.testing.assert_close(compressor(features).tokens[196:], pool_grid(features, 7).mean(dim=0))


# -- FTFV weighted token sampler (section 3.2.1) ------------------------------------------------------------
def test_weighted_sampler_keeps_the_k_queries_with_the_highest_maximum_attention():
    torch.manual_seed(0)
    sampler = build_compressor("weighted-sampler", dim=DIM, num_queries=32, keep=8, dim_head=16).eval()
    features = _features(3)
    block = sampler(features)
    assert block.count == 3 * 8
    # recompute eq. 1 and 2 from the module's parameters, independently of its forward pass
    keys = sampler.to_k(F.layer_norm(features, (DIM,), sampler.norm.weight, sampler.norm.bias) + sincos_2d(27, DIM))
    weights = (torch.einsum("nc,tlc->tnl", sampler.queries, keys) / math.sqrt(16)).softmax(dim=-1)  # (T, N, L)
    outputs = weights @ features  # (T, N, D): attention-weighted patch features
    for t in range(3):
        order = weights[t].max(dim=-1).values.argsort(descending=True)[:8]
        torch.testing.assert_close(block.tokens[t * 8 : (t + 1) * 8], outputs[t, order], rtol=1e-4, atol=1e-5)


def test_weighted_sampler_drops_queries_that_find_nothing():
    sampler = build_compressor("weighted-sampler", dim=DIM, num_queries=16, keep=4, dim_head=16).eval()
    chosen = [3, 7, 11, 14]
    with torch.no_grad():
        sampler.queries.zero_()  # a zero query attends uniformly: its maximum weight is 1/729
        for rank, q in enumerate(chosen):  # peaky queries, sharpest first
            sampler.queries[q] = torch.randn(16, generator=torch.Generator().manual_seed(q)) * (40 - 5 * rank)
    weights, outputs = sampler.attend(_features(1))
    assert torch.allclose(weights[0, 0].max(), torch.tensor(1 / PATCHES))
    block = sampler(_features(1))
    kept = [int(torch.cdist(tok[None], outputs[0]).argmin()) for tok in block.tokens]
    assert sorted(kept) == chosen


# -- AVS/SVC (section 3.2.2, eq. 10) ------------------------------------------------------------------------
def test_untrained_svc_latent_is_the_3d_average_pool():
    svc = build_compressor("svc", dim=DIM, bottleneck=16)
    for frames in range(1, 5):
        features = _features(frames)
        block = svc(features)
        assert block.count == 49 and block.slow == 0
        # 4x4x4: every frame of the segment (ceil(T/4) = 1) and 4x4 windows of the 27x27 grid
        torch.testing.assert_close(block.tokens, pool_grid(features, 7).mean(dim=0), rtol=1e-5, atol=1e-5)


def test_svc_latent_is_residual_plus_average_pool():
    torch.manual_seed(0)
    svc = build_compressor("svc", dim=DIM, bottleneck=16)
    with torch.no_grad():  # as if trained: the zero-initialised last convolutions get weights
        for name, param in svc.named_parameters():
            if param.abs().sum() == 0:
                param.normal_(std=0.05)
    features = _features(4)
    block = svc(features)
    residual = svc.residual(features[None])[0]  # C(f): (D, t, h, w)
    assert residual.abs().mean() > 1e-3
    expected = residual.flatten(1).T + pool_grid(features, 7).mean(dim=0)  # C(f) + avgpool3d(f), (49, D)
    torch.testing.assert_close(block.tokens, expected, rtol=1e-4, atol=1e-5)


def test_svc_ratio_sets_the_latent_grid():
    svc = build_compressor("svc", dim=DIM, ratio=(2, 2, 2), bottleneck=16)
    assert [svc.token_count(t) for t in range(1, 5)] == [196, 196, 392, 392]  # (ceil(T/2), 14, 14)
    assert svc(_features(3)).count == 392
    decoded = svc.decode(svc.encode(_features(3)[None]), 3)
    assert decoded.shape == (1, 3, PATCHES, DIM)


# -- DynFocus (DPC-KNN, cones and rods) ----------------------------------------------------------------------
def _clusters(sizes=(30, 20, 12), dim=16, spread=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=gen) * 3
    points = torch.cat([centres[i] + spread * torch.randn(n, dim, generator=gen) for i, n in enumerate(sizes)])
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    perm = torch.randperm(len(labels), generator=gen)
    return points[perm], labels[perm], centres


def test_dpc_knn_picks_one_density_peak_per_known_cluster():
    points, labels, _ = _clusters()
    peaks = dpc_knn(points, 3, k=5)
    assert sorted(labels[peaks.centers].tolist()) == [0, 1, 2]  # one centre in each cluster
    for c, centre in enumerate(peaks.centers.tolist()):
        members = (labels == labels[centre]).nonzero().flatten()
        # the centre is the densest point of its cluster
        assert peaks.density[centre] == peaks.density[members].max()
        # and the clustering recovers the cluster exactly
        assert set((peaks.assign == c).nonzero().flatten().tolist()) == set(members.tolist())


def test_dynfocus_spatial_prototypes_find_the_objects_in_a_frame():
    gen = torch.Generator().manual_seed(1)
    objects = torch.randn(3, DIM, generator=gen) * 4
    layout = torch.randint(0, 3, (PATCHES,), generator=gen)  # which object each patch shows
    frame = objects[layout] + 0.05 * torch.randn(PATCHES, DIM, generator=gen)
    dynfocus = build_compressor("dynfocus", dim=DIM, spatial=(3,))
    prototypes = dynfocus.spatial_prototypes(frame)[0]  # (3, D)
    distance = torch.cdist(prototypes, objects)  # every prototype sits on one distinct object
    assert sorted(distance.argmin(dim=1).tolist()) == [0, 1, 2]
    assert distance.min(dim=1).values.max() < 0.01 * distance.max()  # objects lie ~40 apart


def test_dynfocus_gives_cones_to_one_frame_per_event():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(PATCHES, DIM, generator=gen)
    # frames 0, 1, 3 repeat one scene; frame 2 shows another: two events, so two density peaks
    frames = torch.stack([base + 0.01 * torch.randn(PATCHES, DIM, generator=gen) for _ in range(4)])
    frames[2] = torch.randn(PATCHES, DIM, generator=gen) * 2
    dynfocus = build_compressor("dynfocus", dim=DIM, events=2, candidates=2).eval()
    important, events, _ = dynfocus.select_events(frames)
    assert 2 in important.tolist() and len(set(important.tolist()) & {0, 1, 3}) == 1
    block = dynfocus(frames)
    cone = 1 + 64 + 32 + 16
    assert block.count == dynfocus.token_count(4) == 2 * cone + 2 * 2
    # with one event, the Cones go to the repeated scene (the densest peak) and the odd frame gets 2 Rod tokens
    single = build_compressor("dynfocus", dim=DIM, events=1, candidates=2).eval()
    assert single.select_events(frames)[0].tolist()[0] in (0, 1, 3)
    assert single(frames).count == cone + 3 * 2


def test_perturbed_top_k_lets_the_loss_move_a_frame_into_the_selection():
    # DynFocus eq. 7-9: the top-k indicator is an expectation over noisy scores, so it has a gradient
    torch.manual_seed(0)
    scores = torch.tensor([0.9, 0.8, 0.1, 0.75], requires_grad=True)
    indicator = PerturbedTopK.apply(scores, 2, 500, 0.1)
    assert indicator[0] > 0.9 and indicator[2] < 0.05  # close to the hard top-2 {0, 1}
    (-indicator[3]).backward()  # a loss that wants frame 3 selected ...
    assert scores.grad[3] < 0 and scores.grad[1] > 0  # ... raises its score and lowers its rival's


def test_dynfocus_score_network_learns_from_the_language_loss():
    dynfocus = build_compressor("dynfocus", dim=DIM).train()
    dynfocus(_features(4)).tokens.square().mean().backward()
    assert dynfocus.score_net[-1].weight.grad.abs().sum() > 0  # through the perturbed top-k gates


# -- STC-Pruner --------------------------------------------------------------------------------------------
def _block_with_outliers(n=100, outliers=(5, 40, 77), slow=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(DIM, generator=gen)
    tokens = common + 0.05 * torch.randn(n, DIM, generator=gen)
    for i in outliers:
        tokens[i] = torch.randn(DIM, generator=gen) * 2
    return TokenBlock(tokens, slow=slow)


def test_pruner_keeps_the_most_salient_tokens_in_order():
    block = _block_with_outliers()
    pruned = prune(block, keep=3)
    torch.testing.assert_close(pruned.tokens, block.tokens[[5, 40, 77]])
    assert pruned.slow == 2  # tokens 5 and 40 came from the keyframe part
    assert Pruner(keep=0.5)(block).count == 50


def test_pruner_drops_what_the_previous_segment_already_showed():
    block = _block_with_outliers(outliers=(5, 40, 77))
    previous = TokenBlock(block.tokens[[5, 40]].clone(), slow=0)  # two of the outliers were already seen
    scores = salience(block.tokens, previous.tokens, temporal_weight=0.8)
    assert int(scores.argmax()) == 77
    pruned = prune(block, keep=1, previous=previous, temporal_weight=0.8)
    torch.testing.assert_close(pruned.tokens, block.tokens[[77]])
