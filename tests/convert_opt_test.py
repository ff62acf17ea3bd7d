"""convert --opt: the reference's opt.txt (its option printer's format)."""
import json
import shutil

import pytest

from spade_jax import convert
from spade_jax import model_io

# Options of a reference training run beyond the fixture's opt.json, with
# the reference's defaults (str(v) is what its printer writes).
_RUN_OPTIONS = {
    'name': 'label2coco', 'checkpoints_dir': './checkpoints', 'model':
    'pix2pix', 'phase': 'train', 'dataroot': './datasets/cityscapes/',
    'dataset_mode': 'coco', 'batchSize': 1, 'preprocess_mode':
    'scale_width_and_crop', 'load_size': 1024, 'no_flip': False,
    'isTrain': True, 'which_epoch': 'latest', 'lr': 0.0002, 'beta1': 0.0,
    'beta2': 0.9, 'no_TTUR': False, 'niter': 50, 'niter_decay': 0,
    'gan_mode': 'hinge', 'lambda_feat': 10.0, 'lambda_vgg': 10.0,
    'no_vgg_loss': False, 'display_winsize': 400, 'netG': 'spade',
    'label_dir': '', 'max_dataset_size': 9223372036854775807,
    'cache_filelist_read': False, 'gpu_ids': '0,1', 'continue_train': False}
_CHANGED_DEFAULTS = {'label_nc': 13, 'crop_size': 256, 'ngf': 64,
                     'dataset_mode': 'ade20k', 'batchSize': 1}


def _opt_txt(opt, printed=False):
  """Writes `opt` as the reference's save_options / print_options do."""
  lines = []
  for k, v in sorted(opt.items()):
    comment = ''
    if k in _CHANGED_DEFAULTS and v != _CHANGED_DEFAULTS[k]:
      comment = '\t[default: %s]' % str(_CHANGED_DEFAULTS[k])
    lines.append('{:>25}: {:<30}{}\n'.format(str(k), str(v), comment))
  text = ''.join(lines)
  if printed:
    text = ('----------------- Options ---------------\n' + text +
            '----------------- End -------------------')
  return text


@pytest.fixture
def run_opt(reference_dir):
  opt = json.loads((reference_dir / 'opt.json').read_text())
  opt.pop('semantic_nc')  # Computed after the reference saves opt.txt.
  opt.pop('gpu_ids')
  opt.update(_RUN_OPTIONS)
  return opt


@pytest.mark.parametrize('printed', [False, True])
def test_opt_txt_reads_as_the_json_options(run_opt, tmp_path, printed):
  path = tmp_path / 'opt.txt'
  path.write_text(_opt_txt(run_opt, printed))
  assert '\t[default: 13]' in path.read_text()  # label_nc 8 was changed.
  parsed = convert.read_options(str(path))
  assert parsed == run_opt
  assert isinstance(parsed['aspect_ratio'], float)
  assert isinstance(parsed['contain_dontcare_label'], bool)
  assert parsed['label_dir'] == ''
  want = convert.config_from_options(run_opt)
  assert convert.config_from_options(parsed).to_dict() == want.to_dict()


def test_convert_from_opt_txt_equals_opt_json(reference_dir, run_opt,
                                              tmp_path):
  ref = tmp_path / 'run'
  ref.mkdir()
  for f in ('net_G.pth', 'net_D.pth'):
    shutil.copy(reference_dir / f, ref / f)
  (ref / 'opt.txt').write_text(_opt_txt(run_opt))
  (ref / 'opt.json').write_text(json.dumps(run_opt))
  a = convert.convert(str(ref), str(ref / 'opt.txt'), str(tmp_path / 'a'))
  b = convert.convert(str(ref), str(ref / 'opt.json'), str(tmp_path / 'b'))
  assert a.to_dict() == b.to_dict()
  assert (model_io.load_config(str(tmp_path / 'a')).to_dict() ==
          model_io.load_config(str(tmp_path / 'b')).to_dict())


def test_opt_txt_errors_name_the_option(run_opt, tmp_path):
  path = tmp_path / 'opt.txt'

  def fails(opt_text, *expected):
    path.write_text(opt_text)
    with pytest.raises(convert.ConversionError) as e:
      convert.config_from_options(convert.read_options(str(path)))
    for text in expected:
      assert text in str(e.value), str(e.value)

  fails(_opt_txt(dict(run_opt, use_attention_blocks=True)),
        'use_attention_blocks')
  partial = {k: v for k, v in run_opt.items()
             if k not in ('ngf', 'num_D')}
  fails(_opt_txt(partial), "lacks the option(s) ['ngf', 'num_D']")
  fails(_opt_txt(dict(run_opt, crop_size='big')), 'crop_size', 'line',
        'expected a int')
  fails(_opt_txt(dict(run_opt, use_vae='maybe')), 'use_vae', 'expected a bool')
  fails(_opt_txt(run_opt) + 'this is not an option\n', 'line',
        'not a `name: value` line')
  fails(_opt_txt(run_opt) + _opt_txt({'ngf': 8}), 'ngf is given twice')
