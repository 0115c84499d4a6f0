"""The CIFAR model zoo of the CRD benchmark (RepDistiller ``models/``, mirrored by mdistiller ``models/cifar``).

Every family re-implements the published definition with the same module names, so the CRD / mdistiller
teacher checkpoints (``ckpt_epoch_240.pth``, key ``"model"``) load with ``load_state_dict`` unchanged.
Importing this package registers: resnet8/14/20/32/44/56/110, resnet8x4, resnet32x4, wrn_16_1/16_2/40_1/40_2,
vgg8/11/13/16/19 (the BN variants, as in CRD's ``model_dict``), mobilenetv2 (= CRD ``mobile_half``),
shufflev1, shufflev2, resnet50 (CRD ``resnetv2.ResNet50``), plus the CRD / mdistiller spellings
``MobileNetV2``, ``mobile_half``, ``ShuffleV1``, ``ShuffleV2``, ``ResNet50``.

Deviation from CRD common to all families: fixed-size average pooling (``AvgPool2d(8)``, ``avg_pool2d(out, 4)``,
...) is replaced by ``AdaptiveAvgPool2d(1)`` so inputs smaller than 32x32 work. Pooling has no parameters,
so parameter counts and state_dict keys are CRD's; on 32x32 inputs the outputs are identical.
"""
from bench.models.cifar import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
