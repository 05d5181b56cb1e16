"""PruneFL Fig. 2 / Eq. (2): the parameter file exchanged per client and federation, by level.

LeNet-300-100 pruned at 20%/20%/10% per level; for every level the global model is packed as
PruneFL's server sends it (FC weights as COO with the smallest integer type for the indices,
dense when that is smaller) and the bytes of the real encoded task message are measured, beside
the dense message, the ratio Eq. (2) predicts for each FC layer, and the paper's observation that
the sparse form pays off from level 4 on (more than 50% pruned, with 16-bit indices). It also
reports what communication alone would cost on the recipes' Pi-like devices (1.6 Mbit/s).

Run: ``python recipes/prunefl/fig2_payload_size.py`` (no data needed; a second or two)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from lightning_fedprune.core.masks import init_prune, layer_rates  # noqa: E402
from lightning_fedprune.core.messages import ClientTask, encode_task  # noqa: E402
from lightning_fedprune.core.sparse import coo_size_ratio, index_bits, index_dtype_for, pack_state, payload_layout  # noqa: E402
from lightning_fedprune.models import create_model  # noqa: E402

NAME = "fig2_payload_size"
LEVELS = (0, 1, 2, 3, 4, 5, 10, 15, 20, 25, 30)
#: Fig. 2's communication time per federation, from the text (s): level 1 and level 30
PAPER_COMM = {1: 10.57, 30: 0.48}


def main(argv: Sequence[str] | None = None) -> dict:
    args = C.parse_args(__doc__.split("\n\n")[0], argv, rounds=0, quick_rounds=0, name=NAME)
    C.setup_process()
    levels = (0, 4, 30) if args.quick else LEVELS
    model = create_model("lenet300_100")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    rates = layer_rates(model)
    dense = len(encode_task(ClientTask(round=0, client_id=0, weights=state)))
    up = C.PI_LIKE["uplink_mbps"] * 1e6 / 8
    rows, out = [], []
    for level in levels:
        masks = init_prune(state, rates, level)
        packed = pack_state(masks.apply(state), masks)
        size = len(encode_task(ClientTask(round=0, client_id=0, weights=packed, config={"weights_format": "coo"})))
        layout = payload_layout(packed)
        eq2 = []
        for key in rates:
            b = index_bits(index_dtype_for(state[key].shape))
            eq2.append(f"{coo_size_ratio(masks.num_kept(key), masks.num_total(key), b):.2f}")
        comm = 2 * size / up  # download + upload at 1.6 Mbit/s each way
        rows.append([
            level, f"{100 * masks.density():.2f}%", f"{size / 1e3:.1f}", f"{size / dense:.3f}", " ".join(eq2),
            "/".join(layout[k][0] for k in rates), f"{comm:.2f}", str(PAPER_COMM.get(level, "")),
        ])
        out.append({"level": level, "density": masks.density(), "bytes": size, "dense_bytes": dense, "layout": layout})
    C.table(
        "Fig. 2: parameter file per client (task message), LeNet-300-100",
        ["level", "FC kept", "kB", "/ dense", "Eq.2 per FC layer", "layout (c=COO, m=masked, d=dense)", "comm s (ours)", "comm s (paper)"],
        rows,
    )
    first = next((r["level"] for r in out if r["bytes"] < dense), None)
    C.console.print(f"dense message: {dense / 1e3:.1f} kB; the packed one is smaller from level {first} on (paper: level >= 4)")
    C.write_json(args.out, {"levels": out, "dense_bytes": dense, "smaller_from_level": first})
    return {"levels": out, "smaller_from_level": first}


if __name__ == "__main__":
    main()
