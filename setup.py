"""Build: the Python package, the Triton kernels (kernels/ -> vinf_engine.kernels) and the
native extension vinf_engine._C (CMake + pybind11; CUDA kernels when nvcc is found).

VINF_BUILD_EXT=0 skips the native extension. Without cmake it is skipped with a warning; the
engine then runs on its Triton and reference paths. A build that starts and fails is an error.
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if os.environ.get("VINF_BUILD_EXT", "1") == "0":
            print("vinf_engine: VINF_BUILD_EXT=0, skipping the native extension")
            return
        cmake = shutil.which("cmake")
        if cmake is None:
            print("vinf_engine: WARNING cmake not found, skipping the native extension",
                  file=sys.stderr)
            return
        import pybind11
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("VINF_CUDA", "") == "0":
            cfg.append("-DVINF_CUDA=OFF")
        subprocess.run([cmake, ROOT, *cfg], cwd=build_dir, check=True)
        jobs = str(max(1, min(8, os.cpu_count() or 1)))
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    name="vinf_engine",
    version="0.1.0",
    description="Clip-parallel long-video generation for diffusers video models",
    python_requires=">=3.10",
    packages=["vinf_engine", "vinf_engine.ops", "vinf_engine.models", "vinf_engine.kernels"],
    package_dir={"vinf_engine.kernels": "kernels"},
    ext_modules=[CMakeExtension("vinf_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["torch>=2.4", "numpy", "diffusers>=0.30"],
    extras_require={
        "triton": ["triton>=3.0"],
        # vinf_engine.generate and `python -m vinf_engine generate`: text encoders and the mp4
        # encoder (imageio-ffmpeg ships its own ffmpeg binary).
        # Wan: WanTransformer3DModel.from_pretrained needs accelerate.
        # diffusers' WanImageToVideoPipeline cleans prompts with ftfy (unguarded).
        "generate": ["transformers>=4.40", "imageio-ffmpeg>=0.5", "accelerate>=0.31", "ftfy>=6"],
        "test": ["pytest>=8", "transformers>=4.40", "imageio-ffmpeg>=0.5", "accelerate>=0.31",
                 "ftfy>=6"],
    },
)
