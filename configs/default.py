"""Default config: the embedded synthetic landscape data set, a small SPADE model.

Trains with no download and no VGG weights; learns visibly in minutes on a
2-core CPU. Option names follow the reference SPADE implementation.
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  """Returns the default configuration."""
  config = ml_collections.ConfigDict()

  # ---- Data -----------------------------------------------------------------
  # One of: synthetic, coco_stuff, ade20k, cityscapes, facades, custom.
  config.dataset = 'synthetic'
  # Folder holding the TFRecords built by `python -m data_pipelines.build`.
  # Empty: `<workdir>/data` (the synthetic set is generated there on first use).
  config.data_dir = ''
  config.train_split = 'train'
  config.eval_split = 'val'
  config.preprocess_mode = 'resize_and_crop'
  config.load_size = 72
  config.crop_size = 64
  config.aspect_ratio = 1.0
  config.no_flip = False
  # Records per shuffled window (a window never crosses a shard: see
  # spade_jax/data_order.py).
  config.shuffle_buffer_size = 1000
  # Read the data in the order this many processes would (0: the run's own
  # process count; else a multiple of it). Set it to an earlier run's count
  # to resume that run bit-exactly with another number of processes.
  config.data_order_processes = 0
  config.prefetch = 2
  # Skip (count and log) bad records instead of stopping with an error that
  # names the shard: undecodable, label ids outside the set's range, a
  # cut-off last record, fewer records than dataset_info.json says.
  config.skip_bad_records = False
  # Synthetic data set only: how many scenes to generate per split.
  config.synthetic_num_train = 2000
  config.synthetic_num_val = 64
  config.synthetic_size = 96

  # ---- Model (reference option names) ----------------------------------------
  config.netG = 'spade'  # spade | pix2pixhd
  config.label_nc = 8
  config.contain_dontcare_label = False
  config.no_instance = False
  config.ngf = 16
  config.ndf = 16
  config.norm_G = 'spectralspadesyncbatch3x3'
  config.norm_D = 'spectralinstance'
  config.norm_E = 'spectralinstance'
  config.num_upsampling_layers = 'normal'  # normal | more | most
  config.use_vae = False
  config.z_dim = 256
  config.n_layers_D = 3
  config.num_D = 2
  # pix2pixHD generator options (netG = 'pix2pixhd').
  config.resnet_n_downsample = 4
  config.resnet_n_blocks = 9
  config.resnet_kernel_size = 3
  config.resnet_initial_kernel_size = 7
  # Compute dtype of activations and convolutions: float32 or bfloat16.
  # Parameters and BatchNorm statistics always stay float32.
  config.compute_dtype = 'float32'
  # Exact alternative computations: same function, same parameters (see
  # docs/performance.md for what each was measured to gain or lose).
  # SPADE's first conv on the one-hot label map as a per-offset lookup of
  # kernel rows by class id, instead of a dense conv over label_nc channels.
  # None (unset): on where it was measured faster, the CPU backend.
  config.spade_label_lookup = config_dict.placeholder(bool)
  # SPADE's mlp_gamma / mlp_beta exactly, boundary-sparse: per-class values
  # where the 5x5 label neighbourhood is one class without edges, the dense
  # conv on the gathered other pixels (dense for a batch with more than the
  # capacity), at resolutions whose shorter side >= spade_sparse_min_size.
  # None (unset): on for the CPU backend, where it was measured faster
  # (models.spade_sparse); dense on accelerators and with spatial_partitions
  # > 1 (untested there).
  config.spade_sparse = config_dict.placeholder(bool)
  # Capacity as a share of a batch's pixels at every such resolution; None:
  # the per-resolution table measured on COCO-Stuff (models.SPARSE_CAPACITY).
  config.spade_sparse_capacity = config_dict.placeholder(float)
  # 256: at 128x128 (ngf 32) the dense path trained faster, and a 256x256
  # model trained faster sparse only at 256 than sparse at 128 and 256 too
  # (docs/performance.md).
  config.spade_sparse_min_size = 256
  # False only to count the sparse branch's FLOPs (scripts/benchmark.py):
  # without the dense fallback a batch over the capacity gives NaN.
  config.spade_sparse_fallback = True
  # Convolution implementation: auto | xla | padding_only. auto: XLA's, plus
  # CPU workarounds: convs padded beyond (k - 1) // 2 padded outside, kernel
  # gradients of large maps as matrix products (layers.conv2d).
  config.conv_impl = 'auto'

  # ---- Losses ----------------------------------------------------------------
  config.gan_mode = 'hinge'  # hinge | ls | original
  config.lambda_feat = 10.0
  config.lambda_vgg = 0.0  # The paper uses 10 (needs config.vgg_weights).
  config.lambda_kld = 0.05
  config.no_ganFeat_loss = False
  # torchvision `vgg19` state-dict (.pth) or .npz with the same keys.
  config.vgg_weights = ''

  # Differentiable augmentation of the discriminator's real and fake inputs
  # (`spade_jax/diffaugment.py`), for small data sets: a comma-separated
  # subset of 'color,translation,cutout'; '' = off.
  config.diffaugment = ''

  # ---- Optimisation ----------------------------------------------------------
  config.lr = 2e-4
  config.no_TTUR = False
  # Adam's betas; None: the reference's default for the mode (TTUR 0 / 0.9,
  # no_TTUR 0.5 / 0.999). Values set here are used in both modes.
  config.beta1 = config_dict.placeholder(float)
  config.beta2 = config_dict.placeholder(float)
  # Adam's epsilon (PyTorch's and optax's default). Adam's first steps are
  # about lr * sign(gradient); a large eps (>> |gradient|) makes it SGD-like.
  config.adam_eps = 1e-8
  # Linear decay schedule given in epochs, as in the reference.
  config.niter = 50
  config.niter_decay = 0
  # Exponential moving average of the generator weights (0 = off).
  config.ema_decay = 0.0

  # ---- Loop ------------------------------------------------------------------
  config.seed = 0
  config.batch_size = 4
  # Devices the batch is sharded over: 0 = all of them, N = the first N (one
  # process only; e.g. to time or train on part of a machine).
  config.num_devices = 0
  # Split each image along its height over this many devices (a `spatial`
  # mesh axis; the batch goes over devices / k on `data`): per-device
  # activation memory falls about k-fold, XLA exchanges the convolutions'
  # halo rows. Must divide the devices (of each process) and the generator's
  # first feature map's rows. Same function as 1 (docs/performance.md).
  config.spatial_partitions = 1
  # Rematerialisation: 'none', or 'blocks' (recompute each SPADE residual
  # block of the generator in the backward pass, keeping only its inputs:
  # less memory for more compute; the same values). docs/performance.md.
  config.remat = 'none'
  config.num_train_steps = 600
  config.log_every_steps = 50
  config.image_every_steps = 100
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  # A converted reference checkpoint to start from (spade_jax.convert output).
  config.init_from = ''

  # ---- Evaluation (--mode eval: FID) -----------------------------------------
  # pytorch-fid's Inception-v3 weights, `pt_inception-2015-12-05-6726825d.pth`
  # (or an .npz made from it with `python -m spade_jax.inception IN OUT.npz`).
  config.inception_weights = ''
  # Images of config.eval_split used for FID (0: all of them).
  config.fid_num_images = 0
  # Precomputed statistics of the real images (pytorch-fid .npz, `mu` and
  # `sigma`; e.g. `python -m spade_jax.fid --real DIR --save_stats F.npz`),
  # used by --mode eval and training FID instead of the eval split's images.
  config.fid_real_stats = ''
  # Training computes FID every this many steps (and at the last step) on
  # process 0, written as eval/fid; 0: never. Needs inception_weights.
  config.fid_every_steps = 0
  # Segmentation score of the paper's Table 1 in --mode eval (mIoU, pixel
  # accuracy): the published weights of the data set's segmenter (see
  # spade_jax/segmenters.py; UperNet: ENCODER.pth,DECODER.pth). '': FID only.
  config.segmenter_weights = ''
  # One pass at the generated images' size instead of the segmenter's own
  # multi-scale protocol.
  config.segmenter_single_scale = False

  return config
