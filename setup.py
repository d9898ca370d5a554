"""Packaging for ldm_course, driven by settings.ini (the nbdev 2 layout).

This is nbdev's classic `setup.py` template without its `pkg_resources` import, which current setuptools no
longer ships.
"""
import shlex
from configparser import ConfigParser

import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": "Apache-2.0"}  # SPDX expression (setuptools deprecates license classifiers)
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable", "6 - Mature", "7 - Inactive"]
py_versions = "3.10 3.11 3.12 3.13".split()

license_expression = licenses[cfg["license"].lower()]
min_python = cfg["min_python"]
requirements = shlex.split(cfg.get("requirements", ""))
dev_requirements = shlex.split(cfg.get("dev_requirements", ""))
console_scripts = shlex.split(cfg.get("console_scripts", ""))

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    license=license_expression,
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"].title(),
        "Natural Language :: " + cfg["language"].title(),
    ] + ["Programming Language :: Python :: " + v for v in py_versions[py_versions.index(min_python):]],
    url=cfg["git_url"],
    # the shipped weights live in ldm_course/weights/, a data-only package (no __init__.py): declared as a package
    # so setuptools ships its files without warning that it is "absent from the packages configuration"
    # (records/ holds recorded results, such as an ablation's numbers and images: a data-only package too)
    packages=setuptools.find_packages(include=["ldm_course", "ldm_course.*"]) + ["ldm_course.weights", "ldm_course.weights.records"],
    include_package_data=True,
    package_data={"ldm_course.weights": ["*.safetensors", "*.json"], "ldm_course.weights.records": ["*.safetensors", "*.json"]},
    install_requires=requirements,
    extras_require={"dev": dev_requirements},
    python_requires=">=" + min_python,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={"console_scripts": console_scripts, "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    author=cfg["author"],
    author_email=cfg["author_email"],
    description=cfg["description"],
    keywords=cfg["keywords"],
)
