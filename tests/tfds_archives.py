"""Small archives in the real formats tfds's builders download, and an offline
transport that serves them to tfds.

Only the network is replaced: :func:`serve` swaps requests' transport
(``HTTPAdapter.send``, below tfds's own session, retries and status checks) for
one that answers the test's URLs with the test's files and fails every other
URL as an offline machine does (``requests.ConnectionError``). tfds's download
manager, its checksum validation, extraction and the builders' generation code
all run as on a user's machine.

Checksums: tfds registers the size and SHA-256 of each real archive, which a
small test archive cannot match. With ``register_checksums=True`` :func:`serve`
puts the test archives' own size and SHA-256 in their place, the one other thing
replaced, so that tfds still validates every served file against a registered
checksum; ``test_tfds_preparation`` shows that an archive whose checksum is not
the registered one is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import tarfile
import urllib.parse
from typing import Dict, Iterator, List, Tuple
from unittest import mock

import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums

CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
}
# ImageNet-LT's lists of the ImageNet training images in its train and
# validation splits (OLTR's ImageNet_LT_train.txt and ImageNet_LT_val.txt).
IMAGENET_LT_LIST_URLS = {
    "train": "https://drive.google.com/uc?export=download&id=1Sl1cwy6Dei1I1BMS1YKjI35fkaR1UA_7",
    "validation": "https://drive.google.com/uc?export=download&id=1AjYczW4khrQrwPIygXUkHF-Qv4QGEsCF",
}
INAT18_URL = "https://ml-inat-competition-datasets.s3.amazonaws.com/2018/"


@dataclasses.dataclass(frozen=True)
class Served:
  """A file the offline transport answers a URL with.

  Attributes:
    filename: the name the server gives it (``Content-Disposition``).
    body: its bytes.
    confirm_page: answer the URL first with Google Drive's "download anyway"
      page (no ``Content-Disposition``) whose form leads to the file, as Drive
      does for files it does not scan.
  """
  filename: str
  body: bytes
  confirm_page: bool = False


_DRIVE_CONFIRMED = "https://drive.usercontent.google.com/download"
_CONFIRM_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan
warning</title></head><body><form id="download-form" action="{action}" method="get">
<input type="submit" value="Download anyway"/><input type="hidden" name="id" value="{id}">
<input type="hidden" name="export" value="download"><input type="hidden" name="confirm"
value="t"><input type="hidden" name="uuid" value="0f1e2d3c"></form></body></html>"""


def _response(request, body: bytes, headers: Dict[str, str]):
  response = requests.Response()
  response.status_code = 200
  response.url = request.url
  response.request = request
  response.headers = requests.structures.CaseInsensitiveDict(
      {"Content-Length": str(len(body)), **headers})
  response.raw = io.BytesIO(body)
  return response


def _file(request, served: Served):
  return _response(request, served.body, {
      "Content-Type": "application/octet-stream",
      "Content-Disposition": f'attachment; filename="{served.filename}"'})


@contextlib.contextmanager
def serve(files: Dict[str, Served], *, register_checksums: bool = True,
          offline: bool = False) -> Iterator[List[str]]:
  """Within the context tfds downloads ``files`` ({URL: Served}) and nothing else.

  Args:
    files: what to serve, by URL.
    register_checksums: register the files' checksums in place of the real
      archives' (False: tfds expects the real archives).
    offline: answer no URL, the files' checksums still registered.

  Yields:
    The URLs requested so far, in order (a list that grows).
  """
  requested = []
  by_drive_id = {url.rsplit("id=", 1)[-1]: served for url, served in files.items()
                 if served.confirm_page}

  def answer(request):
    url = request.url
    if url.startswith(_DRIVE_CONFIRMED + "?"):  # the confirmation page's form
      query = urllib.parse.parse_qs(url.split("?", 1)[1])
      confirmed = query.get("confirm") == ["t"]
      served = by_drive_id.get(query.get("id", [""])[0]) if confirmed else None
      return served and _file(request, served)
    served = files.get(url)
    if served is not None and served.confirm_page:
      page = _CONFIRM_PAGE.format(action=_DRIVE_CONFIRMED, id=url.rsplit("id=", 1)[-1])
      return _response(request, page.encode(), {"Content-Type": "text/html"})
    return served and _file(request, served)

  def send(adapter, request, **unused_kwargs):
    del adapter
    requested.append(request.url)
    response = None if offline else answer(request)
    if response is None:
      raise requests.exceptions.ConnectionError(
          f"offline test: name resolution failed for {request.url}", request=request)
    return response

  infos = {url: checksums.UrlInfo(size=len(served.body),
                                   checksum=hashlib.sha256(served.body).hexdigest(),
                                   filename=served.filename)
           for url, served in files.items()}
  original_init = tfds.download.DownloadManager.__init__

  def init(manager, *args, **kwargs):
    original_init(manager, *args, **kwargs)
    manager._url_infos.update(infos)  # pylint: disable=protected-access

  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(requests.adapters.HTTPAdapter, "send", send))
    if register_checksums:
      stack.enter_context(mock.patch.object(tfds.download.DownloadManager, "__init__",
                                            init))
    yield requested


def _tar(members: Dict[str, bytes], gzip: bool = False) -> bytes:
  buffer = io.BytesIO()
  options = dict(mode="w:gz", compresslevel=1) if gzip else dict(mode="w")
  with tarfile.open(fileobj=buffer, **options) as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


# ----------------------------------------------------------------------------
# CIFAR: the binary version (what tfds downloads). Each record is the label
# byte(s), then 3072 bytes: the red, green and blue 32x32 planes, row-major.


def cifar_split(num_classes: int, per_class: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """Random uint8 images ``[N, 32, 32, 3]`` and labels ``[N]`` (``i % C``)."""
  rng = np.random.default_rng(seed)
  count = num_classes * per_class
  images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
  return images, np.arange(count) % num_classes


def _cifar_records(images: np.ndarray, labels: np.ndarray, cifar100: bool) -> bytes:
  records = []
  for image, label in zip(images, labels):
    # CIFAR-100 records start with the coarse label (any of 20 here).
    head = [label // 5, label] if cifar100 else [label]
    records.append(bytes(head) + image.transpose(2, 0, 1).tobytes())
  return b"".join(records)


def cifar_archive(name: str, train: Tuple[np.ndarray, np.ndarray],
                  test: Tuple[np.ndarray, np.ndarray]) -> Served:
  """``cifar-10-binary.tar.gz`` or ``cifar-100-binary.tar.gz`` of the given
  ``(images, labels)``; CIFAR-10's training images spread over its 5 batches."""
  names = lambda count: "".join(f"class_{i}\n" for i in range(count)).encode()
  if name == "cifar10":
    members = {f"cifar-10-batches-bin/data_batch_{i + 1}.bin": _cifar_records(
        train[0][i::5], train[1][i::5], False) for i in range(5)}
    members["cifar-10-batches-bin/test_batch.bin"] = _cifar_records(*test, False)
    members["cifar-10-batches-bin/batches.meta.txt"] = names(10)
  else:
    members = {"cifar-100-binary/train.bin": _cifar_records(*train, True),
               "cifar-100-binary/test.bin": _cifar_records(*test, True),
               "cifar-100-binary/coarse_label_names.txt": names(20),
               "cifar-100-binary/fine_label_names.txt": names(100)}
  return Served(os.path.basename(CIFAR_URLS[name]), _tar(members, gzip=True))


# ----------------------------------------------------------------------------
# JPEG images of one flat colour per class (colours repeat every 64 classes),
# so that a decoded image names its class.


def class_colour(label: int) -> np.ndarray:
  label %= 64
  return np.array([(37 * label) % 256, (91 * label + 60) % 256,
                   (53 * label + 120) % 256], np.uint8)


@functools.lru_cache(maxsize=None)
def _jpeg(colour: Tuple[int, ...], size: Tuple[int, int]) -> bytes:
  image = np.broadcast_to(np.array(colour, np.uint8), (*size, 3))
  return tf.io.encode_jpeg(np.ascontiguousarray(image), quality=95).numpy()


def jpeg(label: int, size: Tuple[int, int] = (40, 52)) -> bytes:
  return _jpeg(tuple(class_colour(label).tolist()), size)


def tfds_labels(relative_path: str) -> List[str]:
  """The class names of a tfds label file, in label order."""
  return tfds.core.tfds_path(relative_path).read_text().split("\n")[:-1]


# ----------------------------------------------------------------------------
# ImageNet-LT: the ImageNet-2012 archives of the manual download (the training
# archive holds one tar per synset) and the two OLTR lists tfds downloads.


def imagenet_lt(manual_dir: str, train_per_class, validation_classes: int,
                test_images: int) -> Dict[str, Served]:
  """Writes ``ILSVRC2012_img_{train,val}.tar`` into ``manual_dir`` and returns
  the two lists to serve.

  Class c (the c-th synset of tfds's labels.txt) has ``train_per_class[c]``
  images in the LT train list, class c < ``validation_classes`` one in the LT
  validation list, and every class one image that neither list names.
  """
  synsets = tfds_labels("datasets/imagenet2012/labels.txt")
  train_list, validation_list, synset_tars = [], [], {}
  for label, synset in enumerate(synsets):
    count = int(train_per_class[label])
    # names[:count] in the train list, names[count] in the validation list
    # (classes below validation_classes) and names[-1] in neither.
    names = [f"{synset}_{k}.JPEG" for k in range(count + 2)]
    train_list += [f"train/{synset}/{name} {label}" for name in names[:count]]
    if label < validation_classes:
      validation_list.append(f"train/{synset}/{names[count]} {label}")
    synset_tars[f"{synset}.tar"] = _tar({name: jpeg(label) for name in names})
  os.makedirs(manual_dir, exist_ok=True)
  with open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "wb") as f:
    f.write(_tar(synset_tars))
  # ImageNet's validation images; tfds labels them from its own list
  # (validation_labels.txt, in the order of the file names).
  with open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "wb") as f:
    f.write(_tar({f"ILSVRC2012_val_{i + 1:08d}.JPEG": jpeg(0, (48, 36))
                  for i in range(test_images)}))
  text = lambda lines: "".join(line + "\n" for line in lines).encode()
  # The validation list comes through Drive's confirmation page (tfds parses it
  # with BeautifulSoup), the train list directly.
  return {IMAGENET_LT_LIST_URLS["train"]: Served("ImageNet_LT_train.txt", text(train_list)),
          IMAGENET_LT_LIST_URLS["validation"]: Served(
              "ImageNet_LT_val.txt", text(validation_list), confirm_page=True)}


# ----------------------------------------------------------------------------
# iNaturalist 2018: the competition's five archives.


def inat18(train_per_class, validation_classes: int, test_images: int) -> Dict[str, Served]:
  """The five archives of iNaturalist 2018 to serve.

  Category c is the c-th name of tfds's label file, with ``train_per_class[c]``
  training images, one validation image for c < ``validation_classes``, and the
  archive holds one image of category 0 that neither annotation file names.
  """
  names = tfds_labels("image_classification/i_naturalist2018/inaturalist2018_labels.txt")
  supercategories = tfds_labels(
      "image_classification/i_naturalist2018/inaturalist2018_supercategories.txt")
  categories = [{"id": c, "name": name, "supercategory": supercategories[c % 14]}
                for c, name in enumerate(names)]
  images, splits = {}, {"train": ([], []), "val": ([], [])}
  for c in range(len(names)):
    counts = {"train": int(train_per_class[c]), "val": int(c < validation_classes)}
    for split, count in counts.items():
      for k in range(count):
        file_name = f"train_val2018/{categories[c]['supercategory']}/{c}/{split}{k}_{c}.jpg"
        images[file_name] = jpeg(c)
        image_id = len(images)
        splits[split][0].append({"id": image_id, "file_name": file_name})
        splits[split][1].append({"id": image_id, "image_id": image_id, "category_id": c})
  images["train_val2018/Plantae/0/unlisted.jpg"] = jpeg(0)

  def annotations(split):
    return json.dumps({"images": splits[split][0], "annotations": splits[split][1],
                       "categories": categories}).encode()

  archives = {
      "train_val2018.tar.gz": _tar(images, gzip=True),
      "train2018.json.tar.gz": _tar({"train2018.json": annotations("train")}, gzip=True),
      "val2018.json.tar.gz": _tar({"val2018.json": annotations("val")}, gzip=True),
      "test2018.tar.gz": _tar({f"test2018/{i:032x}.jpg": jpeg(1)
                               for i in range(test_images)}, gzip=True),
      "categories.json.tar.gz": _tar(
          {"categories.json": json.dumps(categories).encode()}, gzip=True),
  }
  return {INAT18_URL + name: Served(name, body) for name, body in archives.items()}
