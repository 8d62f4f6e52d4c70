"""render.binning against a brute-force enumeration of (image, tile, depth, item) pairs, on the test
device (integer results: compared exactly)."""
import pytest
import torch

from render.binning import TileGrid, TooManyPairsError, bin_rects


def random_rects(n_images, per_image, grid, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, grid.tiles_x, (n_images * per_image,), generator=g)
    y0 = torch.randint(0, grid.tiles_y, (n_images * per_image,), generator=g)
    x1 = torch.minimum(x0 + torch.randint(0, 4, x0.shape, generator=g), torch.tensor(grid.tiles_x))
    y1 = torch.minimum(y0 + torch.randint(0, 4, y0.shape, generator=g), torch.tensor(grid.tiles_y))
    rects = torch.stack([x0, y0, x1, y1], 1).int()
    depths = torch.randn(n_images * per_image, generator=g) * 5  # negative depths must sort too
    depths[::7] = depths[1]  # ties keep item order
    return rects.to(device), depths.to(device)


def brute_force(rects, depths, n_images, grid):
    per_image = rects.shape[0] // n_images
    tiles = {}
    for i, (x0, y0, x1, y1) in enumerate(rects.tolist()):
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                tiles.setdefault((i // per_image, ty, tx), []).append((depths[i].item(), i))
    return {k: [i for _, i in sorted(v)] for k, v in tiles.items()}


def test_pairs_sorted_by_tile_then_depth(device):
    """Mutation-tested: caught the depth sort reversed and the tile-key sort scrambling depth order."""
    grid = TileGrid(70, 41)  # 5 x 3 tiles, neither side a multiple of 16
    rects, depths = random_rects(3, 40, grid, device)
    binning = bin_rects(rects, depths, 3, grid)
    expected = brute_force(rects, depths, 3, grid)
    assert binning.num_pairs == sum(len(v) for v in expected.values()) > 0
    assert binning.tile_ranges.shape == (3, grid.tiles_y, grid.tiles_x, 2)
    for image in range(3):
        for ty in range(grid.tiles_y):
            for tx in range(grid.tiles_x):
                start, end = binning.tile_ranges[image, ty, tx].tolist()
                assert binning.item_ids[start:end].tolist() == expected.get((image, ty, tx), [])


def test_empty_rectangles_and_no_items(device):
    grid = TileGrid(33, 17)
    rects = torch.tensor([[1, 0, 1, 2], [2, 1, 0, 2]], dtype=torch.int32, device=device)  # zero-width, inverted
    binning = bin_rects(rects, torch.zeros(2, device=device), 1, grid)
    assert binning.num_pairs == 0 and not binning.tile_ranges.any()
    binning = bin_rects(torch.zeros(0, 4, dtype=torch.int32, device=device), torch.zeros(0, device=device), 1, grid)
    assert binning.num_pairs == 0


def test_pair_cap_raises_clear_error(device):
    grid = TileGrid(64, 64)
    rects = torch.tensor([[0, 0, 4, 4]] * 3, dtype=torch.int32, device=device)
    with pytest.raises(TooManyPairsError, match="48 tile/splat pairs exceed max_pairs=40"):
        bin_rects(rects, torch.zeros(3, device=device), 1, grid, max_pairs=40)
    with pytest.raises(ValueError, match="max_pairs"):
        bin_rects(rects, torch.zeros(3, device=device), 1, grid, max_pairs=2**31)


def test_bad_arguments(device):
    grid = TileGrid(32, 32)
    rects = torch.zeros(3, 4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="int32"):
        bin_rects(rects.float(), torch.zeros(3, device=device), 1, grid)
    with pytest.raises(ValueError, match="depths"):
        bin_rects(rects, torch.zeros(2, device=device), 1, grid)
    with pytest.raises(ValueError, match="images"):
        bin_rects(rects, torch.zeros(3, device=device), 2, grid)
