"""Image sources behind the registry: paper datasets on disk, embedded offline sets, user folders.

A *source* yields raw images (float tensors in [0, 1], 1 or 3 channels, any size); a
:class:`~sources.convert.View` turns them into what a model sees (size, gray or colour,
normalization, channel count). Keeping the two apart lets one source be viewed through its
own dataset's eyes or, for public→private alignment, through a private dataset's eyes.
"""
