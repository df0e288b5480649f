#!/usr/bin/env python
"""The paper's controlled comparison in one command: LlamaGen-REPA, GEAR, GEAR with λ_tok = 0 and the two
straight-through arms from one warm-up tokenizer, each followed by the same stage-2 budget; one JSON + one PNG.

    python scripts/reproduce.py --output-dir outputs/reproduce                  # demo scale, ≤ 20 min on 2 cores
    python scripts/reproduce.py --configs configs/tiny --stage0-steps 2 ...     # smoke test
    python scripts/reproduce.py --warmup outputs/demo/stage0 --arms llamagen_repa gear

See `gear_hf.evaluation.compare` for what each arm trains and what is reported.
"""

from gear_hf.evaluation.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
